//! Seedable, checkpointable dropout randomness.
//!
//! candle's CPU RNG cannot be seeded, so dropout masks come from here. The state is just
//! `(seed, calls)`: the `calls`-th mask of a run is a pure function of the seed and that
//! counter, so saving the two numbers is enough for a bit-exact resume.
//!
//! - CPU: ChaCha8 keyed by `seed`, stream = `calls`; element `i` of the mask uses the `i`-th
//!   32-bit word of that stream. Chunks are filled in parallel (rayon;
//!   `set_word_pos` seeks), so the bytes do not depend on the thread count.
//! - CUDA: generating ~10^9 mask elements per ViT-B step on the host and uploading them would
//!   double the step time, so the device's curand generator is used. It is seeded from
//!   `(seed, calls)` once, at the first mask after `new`/`set_state` (candle's `set_seed`
//!   rebuilds the curand generator, far too slow to do for each of the ~25 masks of a step):
//!   a run is reproducible on a given device, not bit-equal to CPU, and a resumed CUDA run
//!   continues from a fresh seed rather than the exact stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The saved form of a [`DropoutRng`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// How many masks have been drawn so far.
    pub calls: u64,
}

/// Counter-based dropout mask generator (interior mutability so `forward_t(&self)` can use it).
#[derive(Debug)]
pub struct DropoutRng {
    state: Mutex<RngState>,
    /// Whether an accelerator's generator has been seeded since `new`/`set_state`.
    device_seeded: AtomicBool,
}

impl Clone for DropoutRng {
    fn clone(&self) -> Self {
        Self::from_state(self.state())
    }
}

/// Mixes a seed and a counter into one 64-bit value (SplitMix64 finaliser).
pub fn mix64(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DropoutRng {
    /// A generator at the start of its stream.
    pub fn new(seed: u64) -> Self {
        Self::from_state(RngState { seed, calls: 0 })
    }

    /// Restores a saved state.
    pub fn from_state(state: RngState) -> Self {
        Self {
            state: Mutex::new(state),
            device_seeded: AtomicBool::new(false),
        }
    }

    /// The current state (save it in a checkpoint).
    pub fn state(&self) -> RngState {
        match self.state.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    /// Overwrites the state (resume).
    pub fn set_state(&self, s: RngState) {
        match self.state.lock() {
            Ok(mut g) => *g = s,
            Err(p) => *p.into_inner() = s,
        }
        self.device_seeded.store(false, Ordering::SeqCst);
    }

    fn next_call(&self) -> RngState {
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let s = *g;
        g.calls += 1;
        s
    }

    /// An inverted-dropout mask of `shape`: each element is `1/(1-p)` with probability `1-p`,
    /// else 0, in `dtype` on `device`. `p` must be in `[0, 1)`.
    pub fn mask(
        &self,
        shape: impl Into<Shape>,
        p: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}")
        }
        let s = self.next_call();
        let scale = 1.0 / (1.0 - p);
        if device.is_cpu() {
            let n = shape.elem_count();
            let threshold = (p * 4_294_967_296.0) as u64; // drop when word < p·2^32
            let mut out = vec![0f32; n];
            fill_mask(&mut out, s, threshold, scale as f32);
            Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(dtype)
        } else {
            if !self.device_seeded.swap(true, Ordering::SeqCst) {
                device.set_seed(mix64(s.seed, s.calls))?;
            }
            let u = Tensor::rand(0f32, 1f32, shape, device)?;
            u.ge(p)?.to_dtype(dtype)?.affine(scale, 0.0)
        }
    }

    /// Applies inverted dropout to `x` (a no-op when `!train` or `p == 0`).
    /// Gradients flow through the multiplication.
    pub fn dropout(&self, x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
        if !train || p == 0.0 {
            return Ok(x.clone());
        }
        let m = self.mask(x.shape(), p, x.dtype(), x.device())?;
        x.mul(&m)
    }
}

const CHUNK: usize = 1 << 16;

fn fill_mask(out: &mut [f32], s: RngState, threshold: u64, scale: f32) {
    let fill = |(ci, chunk): (usize, &mut [f32])| {
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
        rng.set_stream(s.calls);
        rng.set_word_pos((ci * CHUNK) as u128);
        for v in chunk.iter_mut() {
            *v = if (rng.next_u32() as u64) < threshold {
                0.0
            } else {
                scale
            };
        }
    };
    if out.len() <= CHUNK {
        fill((0, out));
    } else {
        use rayon::prelude::*;
        out.par_chunks_mut(CHUNK).enumerate().for_each(fill);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_rate_and_scale() -> Result<()> {
        let rng = DropoutRng::new(7);
        let m = rng.mask((1000, 300), 0.1, DType::F32, &Device::Cpu)?;
        let v = m.flatten_all()?.to_vec1::<f32>()?;
        let zeros = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.1).abs() < 0.005, "drop rate {zeros}");
        let kept: Vec<_> = v.iter().filter(|&&x| x != 0.0).collect();
        assert!(kept.iter().all(|&&x| (x - 1.0 / 0.9).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn state_round_trip_reproduces_masks() -> Result<()> {
        let a = DropoutRng::new(3);
        let _ = a.mask(100_000, 0.5, DType::F32, &Device::Cpu)?;
        let saved = a.state();
        let m1 = a
            .mask(200_000, 0.5, DType::F32, &Device::Cpu)?
            .to_vec1::<f32>()?;
        let b = DropoutRng::from_state(saved);
        let m2 = b
            .mask(200_000, 0.5, DType::F32, &Device::Cpu)?
            .to_vec1::<f32>()?;
        assert_eq!(m1, m2);
        let m3 = b
            .mask(200_000, 0.5, DType::F32, &Device::Cpu)?
            .to_vec1::<f32>()?;
        assert_ne!(m1, m3);
        Ok(())
    }
}
