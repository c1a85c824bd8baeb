//! Inverted dropout with masks drawn from [`crate::philox`] keys: regenerated from the key
//! wherever they are needed, or recorded by the `*_keep` functions as one byte an element
//! (`1` kept, `0` dropped) for a backward to read with [`apply_keep`].
//!
//! An activation of a batch is `rows` samples of `n` elements each (row-major); row `r` is
//! sample `rows[r].sample` in R-Drop pass `rows[r].pass`. Element `i` of row `r` is kept with
//! probability `1 − p` and then multiplied by `1/(1−p)`:
//! ```text
//! y[r, i] = x[r, i] · mask(key(site, rows[r]), i)        mask ∈ {0, 1/(1−p)}
//! ```
//! The backward is the same operation on the gradient (`dx = dy ⊙ mask`).

use rayon::prelude::*;

use crate::gelu::simd;
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

/// A site as the CUDA kernels take it (`SITE_PARAMS` of the `.cu` files: `rd::SiteKey` and
/// whether the site drops anything): the seed's halves, the update, the site, the keep
/// threshold and scale. A site that drops nothing (`None`, or `p == 0`) is inactive: threshold
/// 0, scale 1, the rest 0. `repr(C)`: the host twin of the kernels takes it by pointer.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct KernelSite {
    /// Low 32 bits of the seed.
    pub seed_lo: u32,
    /// High 32 bits of the seed.
    pub seed_hi: u32,
    /// The update.
    pub update: u32,
    /// The site's number.
    pub site: u32,
    /// [`drop_threshold`] of `p`.
    pub threshold: u32,
    /// [`keep_scale`] of `p`.
    pub scale: f32,
    /// Whether the site drops anything.
    pub active: bool,
}

impl KernelSite {
    /// The kernels' form of `site`.
    pub fn of(site: Option<Site>) -> Self {
        match site.filter(|s| s.p != 0.0) {
            Some(s) => Self {
                seed_lo: s.seed as u32,
                seed_hi: (s.seed >> 32) as u32,
                update: s.update,
                site: s.site,
                threshold: drop_threshold(s.p),
                scale: keep_scale(s.p),
                active: true,
            },
            None => Self {
                seed_lo: 0,
                seed_hi: 0,
                update: 0,
                site: 0,
                threshold: 0,
                scale: 1.0,
                active: false,
            },
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
    simd(|| {
        for (b, chunk) in row.chunks_mut(BATCH).enumerate() {
            let w = words_batch(key, (b * LANES) as u32);
            for (v, &w) in chunk.iter_mut().zip(w.iter()) {
                *v = if w < thr { 0.0 } else { *v * scale };
            }
        }
    })
}

// Philox4x32 round multipliers and key increments, as in `crate::philox` (the test
// `batched_words_are_mask_key_blocks` holds the batched generator to `MaskKey::block`).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox blocks generated together (one vector lane each).
const LANES: usize = 16;
/// Mask elements per batch: four words a block.
const BATCH: usize = 4 * LANES;

/// Philox4x32-10 of one block, written as `crate::philox::philox4x32_10` is, inlined so that
/// the loop over lanes in [`words_batch`] vectorises (32×32→64-bit products as `vpmuludq`).
#[inline(always)]
fn philox_block(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (ctr, key);
    for r in 0..10 {
        if r > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The words of elements `4·first .. 4·first + BATCH` of `key`'s mask (blocks `first ..
/// first + LANES`), i.e. `[key.word(4·first + e) for e in 0..BATCH]`, the blocks computed
/// side by side so that the rounds vectorise (`MaskKey::block` computes one at a time).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // the lane index is the vectorised dimension
fn words_batch(key: &MaskKey, first: u32) -> [u32; BATCH] {
    let k = [key.seed as u32, (key.seed >> 32) as u32];
    let (c1, c2, c3) = (key.sample, (key.site << 1) | (key.pass & 1), key.update);
    let mut soa = [[0u32; LANES]; 4];
    for l in 0..LANES {
        let w = philox_block([first.wrapping_add(l as u32), c1, c2, c3], k);
        for (j, w) in w.into_iter().enumerate() {
            soa[j][l] = w;
        }
    }
    std::array::from_fn(|e| soa[e % 4][e / 4])
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

/// The residual branch with dropout: `res[r·n + i] += mask(site, rows[r], i) · y[r·n + i]`
/// (`y` is not modified; `res += y` when `p == 0`). The mask is [`dropout_apply`]'s, so the
/// backward of the branch is `dy = dropout_apply(copy of dres)`. Parallel over rows; the result
/// does not depend on the thread count.
///
/// # Panics
/// If `res` or `y` is not `rows.len()` rows of `n`.
pub fn residual_dropout_add(res: &mut [f32], y: &[f32], n: usize, site: &Site, rows: &[RowKey]) {
    assert_eq!(
        res.len(),
        n * rows.len(),
        "residual_dropout_add: res is not rows × n"
    );
    assert_eq!(
        y.len(),
        res.len(),
        "residual_dropout_add: y and res differ in length"
    );
    if n == 0 {
        return;
    }
    if site.p == 0.0 {
        res.par_chunks_mut(n)
            .zip(y.par_chunks(n))
            .for_each(|(r, y)| {
                for (r, &y) in r.iter_mut().zip(y) {
                    *r += y;
                }
            });
        return;
    }
    let (thr, scale) = (drop_threshold(site.p), keep_scale(site.p));
    res.par_chunks_mut(n)
        .zip(y.par_chunks(n))
        .zip(rows.par_iter())
        .for_each(|((res, y), &rk)| {
            let key = site.key(rk);
            simd(|| {
                for (b, (rb, yb)) in res.chunks_mut(BATCH).zip(y.chunks(BATCH)).enumerate() {
                    let w = words_batch(&key, (b * LANES) as u32);
                    for ((r, &y), &w) in rb.iter_mut().zip(yb).zip(w.iter()) {
                        // m·y with m ∈ {0, scale}, exactly as the reference (and the backward).
                        *r += if w < thr { 0.0 } else { scale } * y;
                    }
                }
            })
        });
}

/// `out = mask ⊙ x` for the site's mask (`x` is not modified; `out = x` when `p == 0`): one
/// pass where a copy and [`dropout_apply`] take two, e.g. for the gradient of a residual
/// branch, `dy_branch = mask ⊙ dres`, which must leave `dres` (the stream's gradient) intact.
/// Parallel over rows; the result does not depend on the thread count.
///
/// # Panics
/// If `out` or `x` is not `rows.len()` rows of `n`.
pub fn dropout_to(out: &mut [f32], x: &[f32], n: usize, site: &Site, rows: &[RowKey]) {
    assert_eq!(out.len(), n * rows.len(), "dropout_to: out is not rows × n");
    assert_eq!(x.len(), out.len(), "dropout_to: x and out differ in length");
    if site.p == 0.0 || n == 0 {
        out.copy_from_slice(x);
        return;
    }
    let (thr, scale) = (drop_threshold(site.p), keep_scale(site.p));
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .zip(rows.par_iter())
        .for_each(|((out, x), &rk)| {
            let key = site.key(rk);
            simd(|| {
                for (b, (ob, xb)) in out.chunks_mut(BATCH).zip(x.chunks(BATCH)).enumerate() {
                    let w = words_batch(&key, (b * LANES) as u32);
                    for ((o, &x), &w) in ob.iter_mut().zip(xb).zip(w.iter()) {
                        *o = if w < thr { 0.0 } else { x * scale };
                    }
                }
            })
        });
}

/// Plain twin of [`residual_dropout_add`]: one element at a time, no threads.
pub fn residual_dropout_add_reference(
    res: &mut [f32],
    y: &[f32],
    n: usize,
    site: &Site,
    rows: &[RowKey],
) {
    assert_eq!(res.len(), n * rows.len());
    assert_eq!(y.len(), res.len());
    for (r, &rk) in rows.iter().enumerate() {
        let key = site.key(rk);
        for i in 0..n {
            let m = if site.p == 0.0 {
                1.0
            } else if key.word(i) >= drop_threshold(site.p) {
                keep_scale(site.p)
            } else {
                0.0
            };
            res[r * n + i] += m * y[r * n + i];
        }
    }
}

/// [`dropout_apply`] that also records the mask: `keep[r·n + i] = 1` where the element is kept,
/// `0` where it is dropped (a byte an element; the backward then reads the mask instead of
/// regenerating it). With `p == 0` nothing is written and `x` is unchanged.
///
/// # Panics
/// If `x` or `keep` is not `rows.len()` rows of `n`.
pub fn dropout_apply_keep(x: &mut [f32], keep: &mut [u8], n: usize, site: &Site, rows: &[RowKey]) {
    assert_eq!(x.len(), n * rows.len(), "dropout: buffer is not rows × n");
    assert_eq!(
        keep.len(),
        x.len(),
        "dropout: mask and buffer differ in length"
    );
    if site.p == 0.0 || n == 0 {
        return;
    }
    let (thr, scale) = (drop_threshold(site.p), keep_scale(site.p));
    x.par_chunks_mut(n)
        .zip(keep.par_chunks_mut(n))
        .zip(rows.par_iter())
        .for_each(|((row, kr), &rk)| {
            let key = site.key(rk);
            simd(|| {
                for (b, (xb, kb)) in row.chunks_mut(BATCH).zip(kr.chunks_mut(BATCH)).enumerate() {
                    let w = words_batch(&key, (b * LANES) as u32);
                    for ((v, k), &w) in xb.iter_mut().zip(kb.iter_mut()).zip(w.iter()) {
                        let kept = w >= thr;
                        *k = kept as u8;
                        *v = if kept { *v * scale } else { 0.0 };
                    }
                }
            })
        });
}

/// [`residual_dropout_add`] that also records the mask in `keep` (as [`dropout_apply_keep`]).
///
/// # Panics
/// If `res`, `y` or `keep` is not `rows.len()` rows of `n`.
pub fn residual_dropout_add_keep(
    res: &mut [f32],
    keep: &mut [u8],
    y: &[f32],
    n: usize,
    site: &Site,
    rows: &[RowKey],
) {
    assert_eq!(
        res.len(),
        n * rows.len(),
        "residual_dropout_add: res is not rows × n"
    );
    assert_eq!(
        y.len(),
        res.len(),
        "residual_dropout_add: y and res differ in length"
    );
    assert_eq!(
        keep.len(),
        res.len(),
        "residual_dropout_add: mask and res differ in length"
    );
    if site.p == 0.0 || n == 0 {
        residual_dropout_add(res, y, n, site, rows);
        return;
    }
    let (thr, scale) = (drop_threshold(site.p), keep_scale(site.p));
    res.par_chunks_mut(n)
        .zip(y.par_chunks(n))
        .zip(keep.par_chunks_mut(n))
        .zip(rows.par_iter())
        .for_each(|(((res, y), kr), &rk)| {
            let key = site.key(rk);
            simd(|| {
                for (b, ((rb, yb), kb)) in res
                    .chunks_mut(BATCH)
                    .zip(y.chunks(BATCH))
                    .zip(kr.chunks_mut(BATCH))
                    .enumerate()
                {
                    let w = words_batch(&key, (b * LANES) as u32);
                    for (((r, &y), k), &w) in rb.iter_mut().zip(yb).zip(kb.iter_mut()).zip(w.iter())
                    {
                        let kept = w >= thr;
                        *k = kept as u8;
                        *r += if kept { scale } else { 0.0 } * y;
                    }
                }
            })
        });
}

/// Chunk of the saved-mask loops (fixed, so results do not depend on the thread count; they
/// are elementwise anyway).
const KEEP_CHUNK: usize = 1 << 14;

/// `x[i] = keep[i] ? x[i]·1/(1−p) : 0`: a recorded mask applied again (e.g. to a gradient).
/// A no-op when `p == 0`.
///
/// # Panics
/// If `keep` and `x` differ in length (when `p > 0`).
pub fn apply_keep(x: &mut [f32], keep: &[u8], p: f32) {
    if p == 0.0 {
        return;
    }
    assert_eq!(
        keep.len(),
        x.len(),
        "apply_keep: mask and buffer differ in length"
    );
    let scale = keep_scale(p);
    x.par_chunks_mut(KEEP_CHUNK)
        .zip(keep.par_chunks(KEEP_CHUNK))
        .for_each(|(x, k)| {
            simd(|| {
                for (v, &k) in x.iter_mut().zip(k) {
                    *v = if k != 0 { *v * scale } else { 0.0 };
                }
            })
        });
}

/// `out[i] = keep[i] ? x[i]·1/(1−p) : 0` (`out = x` when `p == 0`).
///
/// # Panics
/// If `out`, `x` (and `keep` when `p > 0`) differ in length.
pub fn apply_keep_to(out: &mut [f32], x: &[f32], keep: &[u8], p: f32) {
    assert_eq!(
        out.len(),
        x.len(),
        "apply_keep_to: out and x differ in length"
    );
    if p == 0.0 {
        out.copy_from_slice(x);
        return;
    }
    assert_eq!(
        keep.len(),
        x.len(),
        "apply_keep_to: mask and buffer differ in length"
    );
    let scale = keep_scale(p);
    out.par_chunks_mut(KEEP_CHUNK)
        .zip(x.par_chunks(KEEP_CHUNK))
        .zip(keep.par_chunks(KEEP_CHUNK))
        .for_each(|((o, x), k)| {
            simd(|| {
                for ((o, &x), &k) in o.iter_mut().zip(x).zip(k) {
                    *o = if k != 0 { x * scale } else { 0.0 };
                }
            })
        });
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

    #[test]
    fn batched_words_are_mask_key_blocks() {
        let key = MaskKey {
            seed: 0x0123_4567_89ab_cdef,
            update: 77,
            site: 5,
            sample: 1234,
            pass: 1,
        };
        for first in [0u32, 8, 1000, u32::MAX - 3] {
            let w = words_batch(&key, first);
            for (e, &w) in w.iter().enumerate() {
                let b = first.wrapping_add((e / 4) as u32);
                assert_eq!(w, key.block(b)[e % 4], "block {b} word {}", e % 4);
            }
        }
    }

    #[test]
    fn residual_add_matches_reference_and_dropout_apply() {
        let rows: Vec<RowKey> = (0..5)
            .map(|i| RowKey {
                sample: i,
                pass: i % 2,
            })
            .collect();
        let n = 203;
        let y: Vec<f32> = (0..n * rows.len())
            .map(|i| (i as f32 * 0.37).cos())
            .collect();
        let res0: Vec<f32> = (0..n * rows.len())
            .map(|i| (i as f32 * 0.11).sin())
            .collect();
        for p in [0.0, 0.1, 0.5] {
            let site = Site {
                seed: 3,
                update: 7,
                site: 1,
                p,
            };
            let mut outs = Vec::new();
            for t in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap();
                let mut res = res0.clone();
                let mut to = vec![0.0; y.len()];
                pool.install(|| {
                    residual_dropout_add(&mut res, &y, n, &site, &rows);
                    dropout_to(&mut to, &y, n, &site, &rows);
                });
                outs.push((res, to));
            }
            assert!(outs.iter().all(|o| o == &outs[0]), "thread-count dependent");
            let mut want = res0.clone();
            residual_dropout_add_reference(&mut want, &y, n, &site, &rows);
            assert_eq!(outs[0].0, want);
            // Same mask as dropout_apply: res0 + dropout(y).
            let mut dy = y.clone();
            dropout_apply(&mut dy, n, &site, &rows);
            let mut to = vec![f32::NAN; y.len()];
            dropout_to(&mut to, &y, n, &site, &rows);
            assert_eq!(to, dy, "dropout_to is dropout_apply on a copy");
            let sum: Vec<f32> = res0.iter().zip(&dy).map(|(a, b)| a + b).collect();
            assert_eq!(outs[0].0, sum);
        }
    }

    #[test]
    fn saved_masks_equal_regenerated_ones() {
        let rows: Vec<RowKey> = (0..5)
            .map(|i| RowKey {
                sample: 7 + i % 3,
                pass: i / 3,
            })
            .collect();
        let n = 333;
        let x: Vec<f32> = (0..n * rows.len())
            .map(|i| (i as f32 * 0.37).cos())
            .collect();
        let y: Vec<f32> = (0..n * rows.len())
            .map(|i| (i as f32 * 0.11).sin())
            .collect();
        let site = Site {
            seed: 3,
            update: 9,
            site: 4,
            p: 0.3,
        };
        let mut want = x.clone();
        dropout_apply(&mut want, n, &site, &rows);
        let mut got = x.clone();
        let mut keep = vec![0u8; x.len()];
        dropout_apply_keep(&mut got, &mut keep, n, &site, &rows);
        assert_eq!(got, want);
        assert!(keep.contains(&0) && keep.contains(&1));
        let mut again = x.clone();
        apply_keep(&mut again, &keep, site.p);
        assert_eq!(again, want);
        let mut out = vec![f32::NAN; x.len()];
        apply_keep_to(&mut out, &x, &keep, site.p);
        assert_eq!(out, want);
        let mut r1 = x.clone();
        residual_dropout_add(&mut r1, &y, n, &site, &rows);
        let mut r2 = x.clone();
        let mut keep2 = vec![9u8; x.len()];
        residual_dropout_add_keep(&mut r2, &mut keep2, &y, n, &site, &rows);
        assert_eq!(r1, r2);
        assert_eq!(keep, keep2);
        let mut same = x.clone();
        apply_keep(&mut same, &[], 0.0);
        assert_eq!(same, x);
    }

    #[test]
    fn the_kernels_site_splits_the_seed_and_is_inactive_without_dropout() {
        let s = Site {
            seed: 0x1234_5678_9abc_def0,
            update: 7,
            site: 3,
            p: 0.1,
        };
        let k = KernelSite::of(Some(s));
        assert_eq!((k.seed_lo, k.seed_hi), (0x9abc_def0, 0x1234_5678));
        assert_eq!((k.update, k.site, k.active), (7, 3, true));
        assert_eq!(
            (k.threshold, k.scale),
            (drop_threshold(0.1), keep_scale(0.1))
        );
        let none = KernelSite::of(None);
        assert!(!none.active && none.threshold == 0 && none.scale == 1.0);
        assert_eq!(KernelSite::of(Some(Site { p: 0.0, ..s })), none);
    }
}
