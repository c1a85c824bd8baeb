//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
//! counter-based generator of Random123, cuRAND and PyTorch's CUDA dropout.
//!
//! A dropout mask element is a pure function of its key, so the same masks come out on any
//! number of threads, on CPU and on CUDA, after a resume, and in a data-parallel run:
//!
//! ```text
//! key     = (seed lo 32, seed hi 32)
//! counter = (element / 4, sample, site << 1 | pass, update)
//! word    = philox(counter, key)[element % 4]
//! drop  ⇔ word < threshold(p) = round(p · 2^32)        (kept elements are scaled by 1/(1−p))
//! ```
//! `sample` is the sample's index in the update's global batch (micro-batch `j` of size `m`
//! holds samples `j·m .. j·m + m`), `pass` is R-Drop's pass (0 or 1), `site` numbers the
//! dropout sites of the network (the model decides the numbering) and `element` is the
//! element's index inside that sample's slice of the activation (row-major).

/// Philox4x32 round multipliers and key increments (Random123).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: four 32-bit words from a 128-bit counter and a 64-bit key.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
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

/// Where a dropout mask belongs: everything but the element index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaskKey {
    /// The run's seed.
    pub seed: u64,
    /// The update (1-based optimiser step; any number that differs between updates).
    pub update: u32,
    /// The dropout site in the network (the model's numbering).
    pub site: u32,
    /// The sample's index in the update's global batch.
    pub sample: u32,
    /// R-Drop's pass, 0 or 1.
    pub pass: u32,
}

impl MaskKey {
    #[inline]
    fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// The four words for elements `4·block .. 4·block + 4`.
    #[inline]
    pub fn block(&self, block: u32) -> [u32; 4] {
        philox4x32_10(
            [
                block,
                self.sample,
                (self.site << 1) | (self.pass & 1),
                self.update,
            ],
            self.key(),
        )
    }

    /// The random word of element `i`.
    #[inline]
    pub fn word(&self, i: usize) -> u32 {
        self.block((i / 4) as u32)[i % 4]
    }
}

/// The drop threshold for probability `p ∈ [0, 1)`: an element is dropped iff its word is
/// below it. `round(p · 2^32)`, saturating.
pub fn drop_threshold(p: f32) -> u32 {
    let t = (p as f64 * 4_294_967_296.0).round();
    if t >= u32::MAX as f64 {
        u32::MAX
    } else if t <= 0.0 {
        0
    } else {
        t as u32
    }
}

/// `1/(1−p)` as the f32 that kept elements are multiplied by (both engines use this value).
pub fn keep_scale(p: f32) -> f32 {
    (1.0 / (1.0 - p as f64)) as f32
}

/// Fills `out[i] = keep_scale(p)` for kept elements and `0` for dropped ones, `i = 0..len`,
/// for one (sample, site, pass) key.
pub fn fill_mask(key: &MaskKey, p: f32, out: &mut [f32]) {
    let (thr, scale) = (drop_threshold(p), keep_scale(p));
    for (b, chunk) in out.chunks_mut(4).enumerate() {
        let w = key.block(b as u32);
        for (o, &w) in chunk.iter_mut().zip(w.iter()) {
            *o = if w < thr { 0.0 } else { scale };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers of Random123's kat_vectors (listed in docs/engine.md).
    #[test]
    fn known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn mask_rate_scale_and_key_separation() {
        let k = MaskKey {
            seed: 42,
            update: 1,
            site: 3,
            sample: 5,
            pass: 0,
        };
        let mut a = vec![0f32; 100_003];
        fill_mask(&k, 0.1, &mut a);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "{dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || v == keep_scale(0.1)));
        for (i, &v) in a.iter().enumerate().take(1000) {
            assert_eq!(v == 0.0, k.word(i) < drop_threshold(0.1));
        }
        let mut b = vec![0f32; a.len()];
        fill_mask(&MaskKey { pass: 1, ..k }, 0.1, &mut b);
        assert_ne!(a, b);
        fill_mask(&MaskKey { sample: 6, ..k }, 0.1, &mut b);
        assert_ne!(a, b);
        let mut c = vec![0f32; a.len()];
        fill_mask(&k, 0.1, &mut c);
        assert_eq!(a, c);
        fill_mask(&k, 0.0, &mut c);
        assert!(c.iter().all(|&v| v == 1.0));
    }
}
