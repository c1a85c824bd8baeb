//! Seedable, checkpointable dropout masks from keyed Philox4x32-10.
//!
//! Every mask element is a pure function of its key ([`rdrop_kernels::philox`]):
//! ```text
//! (seed, update, site, sample, pass, element)  →  keep_scale(p) or 0
//! ```
//! - `seed`: the run's seed; `update`: the optimiser update being computed (1-based, the
//!   trainer's `step + 1`); `site`: the dropout site in the network (the model's numbering,
//!   e.g. `rdrop_vit::sites`);
//! - `sample`: the sample's index in the update's global batch (micro-batch offset + row),
//!   `pass`: R-Drop's pass (0 or 1); `element`: row-major index inside that sample's slice.
//!
//! Why: an explicit (hand-written) engine, a CUDA kernel, a data-parallel rank or a resumed run
//! can compute the same masks without replaying anyone's call order, so the masks are identical
//! on any thread count, on CPU and CUDA, after a resume, and between the concatenated and the
//! sequential R-Drop passes. The saved state is therefore only the seed and the generator's
//! name ([`GENERATOR`]); the update number comes from the trainer's step.
//!
//! **Batch context.** Before a training forward, the caller says which `(sample, pass)` each
//! row of the batch is: [`DropoutRng::set_context`] (from `RDropModel::set_dropout_context`,
//! called by [`crate::passes::two_pass_logits`]). The model calls
//! [`DropoutRng::begin_forward`] at the start of each train-mode forward, which makes the
//! pending context active (and consumes it); then [`DropoutRng::dropout`] at each site.
//! A train-mode forward with no pending context (tests, ad-hoc use) gets an **automatic
//! context**: rows `i → (sample i, pass 0)` and `update = u32::MAX − n` for the `n`-th such
//! forward of this generator (counting down, away from the trainer's 1-based updates), so two
//! such calls still differ.
//!
//! Masks are built on the host (parallel over rows; the bytes do not depend on the thread
//! count) and moved to the activation's device and dtype. On CUDA this upload is slow but gives
//! exactly the CPU masks; generating them in a kernel is left to the CUDA engine.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use rayon::prelude::*;
pub use rdrop_kernels::dropout::RowKey;
use rdrop_kernels::philox::{fill_mask, MaskKey};
use serde::{Deserialize, Serialize};

/// Name and version of the mask generator; saved in [`RngState`] so that a checkpoint written
/// with other masks is refused rather than continued with different ones.
pub const GENERATOR: &str = "philox4x32-10/seed-update-site-sample-pass/v1";

/// The saved form of a [`DropoutRng`]: the seed and the generator it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// The mask generator ([`GENERATOR`]).
    pub generator: String,
}

impl RngState {
    /// The state of a generator with this seed.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            generator: GENERATOR.to_string(),
        }
    }

    /// Errors unless the state belongs to this version's generator.
    pub fn check_generator(&self) -> Result<()> {
        if self.generator != GENERATOR {
            candle_core::bail!(
                "dropout generator {:?} is not this version's {GENERATOR:?}: its masks cannot be \
                 reproduced",
                self.generator
            )
        }
        Ok(())
    }
}

impl Default for RngState {
    fn default() -> Self {
        Self::new(0)
    }
}

/// Which `(sample, pass)` each row of a training batch is, for one update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropoutContext {
    /// The update (1-based in training; see the module docs for automatic contexts).
    pub update: u32,
    /// Row `r` of the batch tensor is sample `rows[r].sample` in pass `rows[r].pass`.
    pub rows: Vec<RowKey>,
}

impl DropoutContext {
    /// Rows `(offset + i, pass)` for `i in 0..m`: one pass of a micro-batch at `offset`.
    pub fn pass_rows(offset: u32, m: u32, pass: u32) -> Vec<RowKey> {
        (0..m)
            .map(|i| RowKey {
                sample: offset + i,
                pass,
            })
            .collect()
    }
}

#[derive(Debug, Default)]
struct Inner {
    seed: u64,
    /// Set by `set_context`, taken by the next train-mode `begin_forward`.
    pending: Option<DropoutContext>,
    /// The context of the forward in progress.
    active: Option<DropoutContext>,
    /// Automatic contexts handed out so far.
    auto: u32,
}

/// Keyed dropout mask generator (interior mutability so `forward_t(&self)` can use it).
#[derive(Debug)]
pub struct DropoutRng {
    inner: Mutex<Inner>,
}

impl Clone for DropoutRng {
    /// A generator with the same seed and no context.
    fn clone(&self) -> Self {
        Self::new(self.seed())
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

/// The host mask of one site: `rows.len() × n` values, row `r` filled by
/// [`rdrop_kernels::philox::fill_mask`] with key `(seed, update, site, rows[r])`, each
/// `keep_scale(p)` or 0. Parallel over rows; independent of the thread count.
pub fn host_mask(seed: u64, ctx: &DropoutContext, site: u32, p: f32, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * ctx.rows.len()];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(n)
        .zip(ctx.rows.par_iter())
        .for_each(|(row, rk)| {
            let key = MaskKey {
                seed,
                update: ctx.update,
                site,
                sample: rk.sample,
                pass: rk.pass,
            };
            fill_mask(&key, p, row);
        });
    out
}

impl DropoutRng {
    /// A generator for `seed`, with no context.
    pub fn new(seed: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                seed,
                ..Default::default()
            }),
        }
    }

    /// Restores a saved state (errors if it was written for another generator).
    pub fn from_state(state: &RngState) -> Result<Self> {
        state.check_generator()?;
        Ok(Self::new(state.seed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.lock().seed
    }

    /// The saved form (seed and generator name).
    pub fn state(&self) -> RngState {
        RngState::new(self.seed())
    }

    /// Restores a saved state (resume): sets the seed and forgets any context. Errors, leaving
    /// the generator unchanged, if the state was written for another generator.
    pub fn set_state(&self, s: &RngState) -> Result<()> {
        s.check_generator()?;
        let mut g = self.lock();
        *g = Inner {
            seed: s.seed,
            ..Default::default()
        };
        Ok(())
    }

    /// Sets the context of the next train-mode forward: `update` and the `(sample, pass)` of
    /// each batch row. Consumed by that forward's [`DropoutRng::begin_forward`].
    pub fn set_context(&self, update: u32, rows: Vec<RowKey>) {
        self.lock().pending = Some(DropoutContext { update, rows });
    }

    /// Starts a forward of a `batch`-row input. In train mode, the pending context becomes the
    /// active one (its row count must be `batch`), or an automatic one is made (module docs).
    /// Does nothing in eval mode (a pending context waits for the next train forward).
    pub fn begin_forward(&self, batch: usize, train: bool) -> Result<()> {
        if !train {
            return Ok(());
        }
        let mut g = self.lock();
        let ctx = match g.pending.take() {
            Some(ctx) => {
                if ctx.rows.len() != batch {
                    candle_core::bail!(
                        "dropout context has {} rows, the forward's batch has {batch}",
                        ctx.rows.len()
                    )
                }
                ctx
            }
            None => {
                let n = g.auto;
                g.auto = g.auto.wrapping_add(1);
                let Ok(m) = u32::try_from(batch) else {
                    candle_core::bail!("batch of {batch} rows exceeds the mask key's u32 sample")
                };
                DropoutContext {
                    update: u32::MAX - n,
                    rows: DropoutContext::pass_rows(0, m, 0),
                }
            }
        };
        g.active = Some(ctx);
        Ok(())
    }

    /// The context of the forward in progress, if any.
    pub fn context(&self) -> Option<DropoutContext> {
        self.lock().active.clone()
    }

    /// The inverted-dropout mask at `site` for the active context, of `shape` (the first
    /// dimension holds the batch rows, sample-major: each sample's `elem_count / rows`
    /// elements are contiguous in row-major order), each element `keep_scale(p)` or 0, in
    /// `dtype` on `device`. `p` must be in `[0, 1)`; errors without an active context.
    pub fn mask(
        &self,
        shape: impl Into<Shape>,
        p: f64,
        site: u32,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}")
        }
        let (seed, ctx) = {
            let g = self.lock();
            match &g.active {
                Some(ctx) => (g.seed, ctx.clone()),
                None => candle_core::bail!(
                    "dropout at site {site} outside a forward: the model must call \
                     DropoutRng::begin_forward first"
                ),
            }
        };
        if shape.elem_count() == 0 {
            return Tensor::zeros(shape, dtype, device);
        }
        let rows = ctx.rows.len();
        let first = shape.dims().first().copied().unwrap_or(1);
        if rows == 0 || first % rows != 0 {
            candle_core::bail!(
                "dropout at site {site}: shape {shape:?} does not split into the context's {rows} rows"
            )
        }
        let n = shape.elem_count() / rows;
        let host = host_mask(seed, &ctx, site, p as f32, n);
        let m = Tensor::from_vec(host, shape, &Device::Cpu)?;
        let m = if dtype == DType::F32 {
            m
        } else {
            m.to_dtype(dtype)?
        };
        m.to_device(device)
    }

    /// Applies inverted dropout at `site` to `x` (`x · mask`; a no-op when `!train` or
    /// `p == 0`). Gradients flow through the multiplication.
    pub fn dropout(&self, x: &Tensor, p: f64, train: bool, site: u32) -> Result<Tensor> {
        if !train || p == 0.0 {
            return Ok(x.clone());
        }
        let m = self.mask(x.shape(), p, site, x.dtype(), x.device())?;
        x.mul(&m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdrop_kernels::philox::keep_scale;

    fn rows(m: u32) -> Vec<RowKey> {
        DropoutContext::pass_rows(0, m, 0)
    }

    #[test]
    fn mask_rate_scale_and_key() -> Result<()> {
        let rng = DropoutRng::new(7);
        rng.set_context(3, rows(1000));
        rng.begin_forward(1000, true)?;
        let m = rng.mask((1000, 300), 0.1, 5, DType::F32, &Device::Cpu)?;
        let v = m.flatten_all()?.to_vec1::<f32>()?;
        let zeros = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.1).abs() < 0.005, "drop rate {zeros}");
        assert!(v.iter().all(|&x| x == 0.0 || x == keep_scale(0.1)));
        // Row r is fill_mask of key (seed, update, site, sample r, pass 0).
        for r in [0usize, 17, 999] {
            let mut want = vec![0f32; 300];
            let key = MaskKey {
                seed: 7,
                update: 3,
                site: 5,
                sample: r as u32,
                pass: 0,
            };
            fill_mask(&key, 0.1, &mut want);
            assert_eq!(v[r * 300..(r + 1) * 300], want[..], "row {r}");
        }
        Ok(())
    }

    #[test]
    fn context_is_consumed_and_automatic_contexts_differ() -> Result<()> {
        let rng = DropoutRng::new(3);
        let mk = |rng: &DropoutRng| -> Result<Vec<f32>> {
            rng.mask((4, 1000), 0.5, 0, DType::F32, &Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        assert!(mk(&rng).is_err(), "no forward begun");
        rng.set_context(1, rows(4));
        assert!(rng.begin_forward(3, true).is_err(), "row count mismatch");
        rng.set_context(1, rows(4));
        rng.begin_forward(4, false)?; // eval: the context waits
        rng.begin_forward(4, true)?;
        let a = mk(&rng)?;
        rng.begin_forward(4, true)?; // automatic
        assert_eq!(rng.context().map(|c| c.update), Some(u32::MAX));
        let b = mk(&rng)?;
        rng.begin_forward(4, true)?;
        assert_eq!(rng.context().map(|c| c.update), Some(u32::MAX - 1));
        let c = mk(&rng)?;
        assert_ne!(a, b);
        assert_ne!(b, c);
        // The key alone decides: another generator with the same seed and context agrees.
        let other = DropoutRng::from_state(&rng.state())?;
        other.set_context(1, rows(4));
        other.begin_forward(4, true)?;
        assert_eq!(mk(&other)?, a);
        Ok(())
    }

    #[test]
    fn masks_do_not_depend_on_the_thread_count() -> Result<()> {
        let ctx = DropoutContext {
            update: 2,
            rows: (0..64)
                .map(|i| RowKey {
                    sample: i % 32,
                    pass: i / 32,
                })
                .collect(),
        };
        let many = host_mask(11, &ctx, 3, 0.1, 4099);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .map_err(candle_core::Error::wrap)?;
        let single = one.install(|| host_mask(11, &ctx, 3, 0.1, 4099));
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .map_err(candle_core::Error::wrap)?;
        let double = two.install(|| host_mask(11, &ctx, 3, 0.1, 4099));
        assert_eq!(many, single);
        assert_eq!(many, double);
        // The two passes of a sample differ.
        assert_ne!(many[..4099], many[32 * 4099..33 * 4099]);
        Ok(())
    }

    #[test]
    fn state_names_the_generator() {
        let rng = DropoutRng::new(5);
        let s = rng.state();
        assert_eq!(s, RngState::new(5));
        let wrong = RngState {
            generator: "chacha8".into(),
            ..s.clone()
        };
        assert!(rng.set_state(&wrong).is_err());
        assert_eq!(rng.seed(), 5);
        assert!(DropoutRng::from_state(&wrong).is_err());
        assert!(rng.set_state(&RngState::new(9)).is_ok());
        assert_eq!(rng.seed(), 9);
    }
}
