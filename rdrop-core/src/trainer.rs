//! One R-Drop training update, composed: two passes, loss, accumulation over micro-batches,
//! loss (un)scaling, clipping, the scheduled learning rate and the optimiser step
//! (<https://arxiv.org/abs/2106.14448>).
//!
//! Update `k` (1-based) over micro-batches `(x_j, y_j)`, `j = 1..A`:
//! ```text
//! for each j:  (p, q) = two passes of x_j;  L_j = rdrop_loss(p, q, y_j)
//!              G += ∇(w_j · s · L_j)            (only the variables' gradients are kept)
//! G = G / s                                     (f16: s = loss scale; otherwise s = 1)
//! f16 and G not finite  → skip the optimiser step, halve s       (the update still counts)
//! G = clip(G, max_norm)                         (torch clip_grad_norm_ semantics)
//! θ = optimiser(θ, G, lr = base_lr · lr_lambda(k))
//! ```
//! with `w_j = n_j / Σ n` in `mean` mode (the update's loss is the mean over all its samples,
//! whatever the micro-batching) and `w_j = 1/A` in `reference` mode (the reference's
//! `loss / gradient_accumulation_steps`). Both are `1/A` for equal micro-batches.
//!
//! Dropout masks are keyed by `(seed, k, site, sample, pass)` ([`crate::rng`]), where `sample`
//! is the sample's index among the update's `Σ n` samples (micro-batch offset + row), so an
//! update's masks do not depend on how it is split into micro-batches, on the two-pass mode,
//! or on where a resumed run starts.
//!
//! Master weights are the model's f32 variables; with `precision = bf16 | f16` the input is cast
//! to that dtype and the model is expected to compute in its input's dtype (casting its f32
//! variables, whose gradients then come back in f32). Logits are cast to f32 for the loss.
//!
//! Hot path: everything is tensor ops on the variables' device; the only host sync per update
//! reads back `[loss, ce, kl, grad_norm]` (needed for the inf/NaN decision and for logging),
//! unless `sync_timing` asks for a sync after each phase to time them.

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::clip::clip_grad_norm;
use crate::dist::Collective;
use crate::error::{CoreError, Result};
use crate::loss::{rdrop_loss, LossConfig};
use crate::model::RDropModel;
use crate::optim::{OptimConfig, Optimizer};
use crate::passes::{two_pass_logits, TwoPass};
use crate::scaler::{LossScaler, ScalerConfig};
use crate::schedule::{lr_lambda, ScheduleConfig};
use crate::split::UpdateSplit;
use crate::state::TrainState;

/// Forward precision (master weights and optimiser stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 forward (CPU and any GPU).
    #[default]
    F32,
    /// bf16 forward, no loss scaling (CUDA sm_80+).
    Bf16,
    /// f16 forward with dynamic loss scaling (the reference's apex O2).
    F16,
}

impl Precision {
    /// The forward dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// Everything an update needs. `Default` is the R-Drop ViT recipe (α 0.3, SGD momentum 0.9,
/// lr 1e-2, warm-up 500 + cosine over 10000 updates, clip 1.0, 16 × 32 micro-batches, concat
/// passes) except the precision, which defaults to f32 so that it runs anywhere (the reference
/// used f16 with loss scale 2^20: `precision = "f16"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The R-Drop objective.
    pub loss: LossConfig,
    /// The optimiser (and base learning rate).
    pub optim: OptimConfig,
    /// The learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// Global gradient-norm clipping threshold (`None`: no clipping).
    pub clip_norm: Option<f64>,
    /// Micro-batches per update (gradient accumulation); [`Trainer::update`] checks it.
    pub accum_steps: usize,
    /// Samples per micro-batch (for the caller's data loader; not enforced).
    pub micro_batch: usize,
    /// How the two passes run.
    pub two_pass: TwoPass,
    /// Forward precision.
    pub precision: Precision,
    /// Dynamic loss scaling (used with `precision = f16` only).
    pub scaler: ScalerConfig,
    /// Synchronise the device after each phase so that `forward_s`/`backward_s`/`optimizer_s`
    /// are true device times (benchmarks); off by default (costs throughput on CUDA).
    pub sync_timing: bool,
    /// Data parallel, explicit engines: the gradients are summed over the ranks in buckets of
    /// at least this many MiB (whole blocks), each as soon as the last micro-batch's backward
    /// has finished it, overlapped with the rest of the backward ([`crate::dist::bucket`]).
    /// `0`: one all-reduce of the whole buffer after the backward. Default 25 (PyTorch DDP's).
    pub grad_bucket_mb: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            loss: LossConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            clip_norm: Some(1.0),
            accum_steps: 16,
            micro_batch: 32,
            two_pass: TwoPass::Concat,
            precision: Precision::F32,
            scaler: ScalerConfig::default(),
            sync_timing: false,
            grad_bucket_mb: 25.0,
        }
    }
}

impl TrainConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        self.optim.validate().map_err(CoreError::Config)?;
        if self.accum_steps == 0 {
            return Err(CoreError::Config("accum_steps must be ≥ 1".into()));
        }
        if let Some(c) = self.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(CoreError::Config(format!("clip_norm must be > 0, got {c}")));
            }
        }
        if !(0.0..1.0).contains(&self.loss.label_smoothing) {
            return Err(CoreError::Config(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.loss.label_smoothing
            )));
        }
        if !(self.loss.alpha.is_finite() && self.loss.alpha >= 0.0) {
            return Err(CoreError::Config(format!(
                "alpha must be finite and ≥ 0, got {}",
                self.loss.alpha
            )));
        }
        if !(self.grad_bucket_mb.is_finite() && self.grad_bucket_mb >= 0.0) {
            return Err(CoreError::Config(format!(
                "grad_bucket_mb must be a number ≥ 0 (0: no buckets), got {}",
                self.grad_bucket_mb
            )));
        }
        if self.schedule.total_steps == 0 {
            return Err(CoreError::Config("schedule.total_steps must be ≥ 1".into()));
        }
        if self.precision == Precision::F16
            && !(self.scaler.init_scale.is_finite() && self.scaler.init_scale >= 1.0)
        {
            return Err(CoreError::Config(format!(
                "scaler.init_scale must be ≥ 1, got {}",
                self.scaler.init_scale
            )));
        }
        Ok(())
    }
}

/// What one update did (host values: read with the update's single sync).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// The update's number (1-based; skipped f16 updates count).
    pub step: u64,
    /// Learning rate used: `base_lr · lr_lambda(step)`.
    pub lr: f64,
    /// The update's loss: weighted mean of the micro-batches' losses (unscaled).
    pub loss: f64,
    /// The update's cross-entropy term (same weighting).
    pub ce: f64,
    /// The update's KL term, before α (same weighting).
    pub kl: f64,
    /// Global gradient norm before clipping (unscaled).
    pub grad_norm: f64,
    /// Loss scale used for this update (1 unless f16).
    pub loss_scale: f64,
    /// Whether the optimiser step was skipped (f16 overflow).
    pub skipped: bool,
    /// Updates skipped so far in the run.
    pub skipped_total: u64,
    /// Micro-batches in the update.
    pub micro_batches: usize,
    /// Samples in the update.
    pub samples: usize,
    /// Seconds in the forward passes and the loss.
    pub forward_s: f64,
    /// Seconds in the backward passes and accumulation.
    pub backward_s: f64,
    /// Seconds in unscaling, clipping, the sync and the optimiser step.
    pub optimizer_s: f64,
}

struct Pending {
    grads: Vec<Option<Tensor>>,
    loss: Option<Tensor>,
    ce: Option<Tensor>,
    kl: Option<Tensor>,
    micro_batches: usize,
    samples: usize,
    forward_s: f64,
    backward_s: f64,
}

/// [`CoreError::NonFinite`] when update `step`'s loss or gradient norm is inf/NaN (where no
/// loss scaler can absorb it), for [`skip_update`].
fn check_finite(step: u64, loss: f64, grad_norm: f64) -> Result<()> {
    if !loss.is_finite() {
        return Err(CoreError::NonFinite {
            step,
            what: "loss",
            value: loss,
        });
    }
    if !grad_norm.is_finite() {
        return Err(CoreError::NonFinite {
            step,
            what: "gradient norm",
            value: grad_norm,
        });
    }
    Ok(())
}

/// Whether update `step` is skipped (`true`): with the f16 loss scaler, a non-finite loss or
/// gradient norm skips the update and backs the scale off; without it, that is an error
/// ([`check_finite`]). Shared by [`Trainer`] and [`crate::FlatTrainer`].
pub(crate) fn skip_update(
    scaler: &mut LossScaler,
    step: u64,
    loss: f64,
    grad_norm: f64,
) -> Result<bool> {
    if !scaler.enabled() {
        check_finite(step, loss, grad_norm)?;
    }
    Ok(scaler.update(!loss.is_finite() || !grad_norm.is_finite()))
}

/// Sets `scaler` to the checkpoint's (an error when the checkpoint was, or was not, trained
/// with loss scaling and `precision` says otherwise). Shared by [`Trainer`] and
/// [`crate::FlatTrainer`].
pub(crate) fn restore_scaler(
    scaler: &mut LossScaler,
    state: &TrainState,
    precision: Precision,
) -> Result<()> {
    if state.scaler.enabled != scaler.enabled() {
        return Err(CoreError::Config(format!(
            "checkpoint loss scaler enabled = {}, but precision {precision:?} needs {}",
            state.scaler.enabled,
            scaler.enabled()
        )));
    }
    scaler.set_state(state.scaler);
    Ok(())
}

/// Runs R-Drop updates on a fixed list of variables; owns the optimiser and the loss scaler.
pub struct Trainer {
    cfg: TrainConfig,
    vars: Vec<(String, Var)>,
    opt: Optimizer,
    scaler: LossScaler,
    step: u64,
    pending: Option<Pending>,
    /// Global index of this rank's first sample in the update (0 outside a distributed update).
    sample_base: usize,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("cfg", &self.cfg)
            .field("step", &self.step)
            .finish()
    }
}

fn add_opt(acc: Option<Tensor>, t: Tensor) -> candle_core::Result<Tensor> {
    match acc {
        None => Ok(t),
        Some(a) => a + t,
    }
}

impl Trainer {
    /// A trainer for `vars` (usually `model.named_vars()`), at update 0.
    pub fn new(cfg: TrainConfig, vars: Vec<(String, Var)>) -> Result<Self> {
        cfg.validate()?;
        if let Some((name, v)) = vars.iter().find(|(_, v)| !v.dtype().is_float()) {
            return Err(CoreError::Config(format!(
                "variable {name} has non-float dtype {:?}",
                v.dtype()
            )));
        }
        let opt = Optimizer::new(cfg.optim, vars.clone())?;
        let scaler = LossScaler::new(cfg.scaler, cfg.precision == Precision::F16);
        Ok(Self {
            cfg,
            vars,
            opt,
            scaler,
            step: 0,
            pending: None,
            sample_base: 0,
        })
    }

    /// A trainer for `model`'s variables resumed from `state` (optimiser, scaler, update count)
    /// and the model's dropout RNG set to `state.rng` (an error if it names another generator). The weights are loaded separately
    /// (e.g. [`crate::checkpoint::load_vars`]).
    pub fn restore<M: RDropModel + ?Sized>(
        cfg: TrainConfig,
        model: &M,
        state: &TrainState,
    ) -> Result<Self> {
        let mut t = Self::new(cfg, model.named_vars())?;
        t.opt.load_state(&state.optimizer)?;
        restore_scaler(&mut t.scaler, state, cfg.precision)?;
        t.step = state.step;
        // The masks' update number comes from `step`, so the seed is all the RNG needs.
        model.set_rng_state(&state.rng)?;
        Ok(t)
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Updates completed so far (the next update is `step() + 1`).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The current loss scale (1 unless f16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.scale()
    }

    /// The variables being trained.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The checkpointable state; `epoch` and `batch_index` are the caller's position in the data
    /// (e.g. the next micro-batch to read), the RNG state is the model's.
    pub fn state<M: RDropModel + ?Sized>(
        &self,
        model: &M,
        epoch: u64,
        batch_index: u64,
    ) -> TrainState {
        TrainState {
            step: self.step,
            epoch,
            batch_index,
            rng: model.rng_state(),
            scaler: self.scaler.state(),
            optimizer: self.opt.state(),
            extra: serde_json::Value::Null,
        }
    }

    /// One full update over `micro_batches` (`x`, labels `y` as `u32`), which must number
    /// `accum_steps`. See the module docs for the exact sequence.
    ///
    /// Errors: [`CoreError::NonFinite`] when the loss or gradient norm is inf/NaN in f32/bf16
    /// (the parameters are left unchanged).
    pub fn update<M: RDropModel + ?Sized>(
        &mut self,
        model: &M,
        micro_batches: &[(Tensor, Tensor)],
    ) -> Result<StepStats> {
        self.update_with(model, micro_batches, None)
    }

    /// One data-parallel update, as [`crate::FlatTrainer::update_distributed`]: this rank's
    /// micro-batches are its share of the global batch (rank `r` of `N`, `n` local samples,
    /// `B = N·n`), masks are keyed by global sample index (`r·n +` local offset), the weights
    /// are `m_j / B` (mean) or `1 / (accum·N)` (reference), and before the unscale/clip/step the
    /// gradients are summed over the ranks ([`crate::dist::all_reduce_grads`]) and
    /// `(loss, ce, kl, n)` with `all_reduce_f64`. Every rank then takes the same step (the f16
    /// scaler decides on the summed values, so it skips on every rank or on none).
    /// `StepStats::samples` is `B`. The reductions run even in a world of one.
    pub fn update_distributed<M: RDropModel + ?Sized>(
        &mut self,
        model: &M,
        micro_batches: &[(Tensor, Tensor)],
        collective: &dyn Collective,
    ) -> Result<StepStats> {
        self.update_with(model, micro_batches, Some(collective))
    }

    fn update_with<M: RDropModel + ?Sized>(
        &mut self,
        model: &M,
        micro_batches: &[(Tensor, Tensor)],
        collective: Option<&dyn Collective>,
    ) -> Result<StepStats> {
        let split = UpdateSplit::new(
            micro_batches,
            self.cfg.accum_steps,
            self.cfg.loss.mode,
            collective,
        )?;
        self.pending = None;
        self.sample_base = split.rank * split.local;
        for ((x, y), &(_, w)) in micro_batches.iter().zip(&split.micro) {
            if let Err(e) = self.accumulate(model, x, y, w) {
                self.pending = None;
                self.sample_base = 0;
                return Err(e);
            }
        }
        self.sample_base = 0;
        if let Some(c) = collective {
            if let Err(e) = self.reduce_pending(c, &split) {
                self.pending = None;
                return Err(e);
            }
        }
        self.finish_update()
    }

    /// Sums the pending gradients and statistics over the ranks.
    fn reduce_pending(&mut self, c: &dyn Collective, split: &UpdateSplit) -> Result<()> {
        let Some(pend) = self.pending.as_mut() else {
            return Err(CoreError::Config("no pending update to reduce".into()));
        };
        crate::dist::all_reduce_grads(&mut pend.grads, c)?;
        let (Some(loss), Some(ce), Some(kl)) = (&pend.loss, &pend.ce, &pend.kl) else {
            return Err(CoreError::Config("no pending update to reduce".into()));
        };
        let dev = loss.device().clone();
        let host = Tensor::stack(&[loss, ce, kl], 0)?.to_vec1::<f32>()?;
        let v = split.reduce_stats(c, [host[0] as f64, host[1] as f64, host[2] as f64])?;
        pend.loss = Some(Tensor::new(v[0] as f32, &dev)?);
        pend.ce = Some(Tensor::new(v[1] as f32, &dev)?);
        pend.kl = Some(Tensor::new(v[2] as f32, &dev)?);
        pend.samples = split.total;
        Ok(())
    }

    /// Streaming form of [`Trainer::update`]: adds the gradient of `weight · loss(x, y)` to the
    /// pending update (use `weight = 1/accum_steps` for equal micro-batches). Only the
    /// variables' gradients are kept; the rest of the backward's store is dropped here.
    pub fn accumulate<M: RDropModel + ?Sized>(
        &mut self,
        model: &M,
        x: &Tensor,
        y: &Tensor,
        weight: f64,
    ) -> Result<()> {
        let t0 = Instant::now();
        let compute = self.cfg.precision.dtype();
        let x = if x.dtype().is_float() && x.dtype() != compute {
            x.to_dtype(compute)?
        } else {
            x.clone()
        };
        // The masks' key: this update's number and the micro-batch's first sample in it.
        let update = u32::try_from(self.step + 1).map_err(|_| {
            CoreError::Config(format!(
                "update {} exceeds the dropout key's u32 update number",
                self.step + 1
            ))
        })?;
        let offset = self.sample_base + self.pending.as_ref().map_or(0, |p| p.samples);
        let offset = u32::try_from(offset).map_err(|_| {
            CoreError::Config(format!(
                "{offset} samples in one update exceed the dropout key's u32 sample index"
            ))
        })?;
        let (p, q) = two_pass_logits(model, &x, self.cfg.two_pass, update, offset)?;
        let (p, q) = match p.dtype() {
            DType::F16 | DType::BF16 => (p.to_dtype(DType::F32)?, q.to_dtype(DType::F32)?),
            _ => (p, q),
        };
        let parts = rdrop_loss(&p, &q, y, &self.cfg.loss)?;
        let objective = parts.loss.affine(weight * self.scaler.scale(), 0.0)?;
        if self.cfg.sync_timing {
            x.device().synchronize()?;
        }
        let t1 = Instant::now();
        let mut store = objective.backward()?;
        let nvars = self.vars.len();
        let pend = self.pending.get_or_insert_with(|| Pending {
            grads: vec![None; nvars],
            loss: None,
            ce: None,
            kl: None,
            micro_batches: 0,
            samples: 0,
            forward_s: 0.0,
            backward_s: 0.0,
        });
        for ((_, v), acc) in self.vars.iter().zip(pend.grads.iter_mut()) {
            if let Some(g) = store.remove(v.as_tensor()) {
                *acc = Some(add_opt(acc.take(), g)?);
            }
        }
        drop(store);
        let stat = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.detach().to_dtype(DType::F32)?.affine(weight, 0.0)
        };
        pend.loss = Some(add_opt(pend.loss.take(), stat(&parts.loss)?)?);
        pend.ce = Some(add_opt(pend.ce.take(), stat(&parts.ce)?)?);
        pend.kl = Some(add_opt(pend.kl.take(), stat(&parts.kl)?)?);
        pend.micro_batches += 1;
        pend.samples += x.dim(0)?;
        if self.cfg.sync_timing {
            x.device().synchronize()?;
        }
        let t2 = Instant::now();
        pend.forward_s += (t1 - t0).as_secs_f64();
        pend.backward_s += (t2 - t1).as_secs_f64();
        Ok(())
    }

    /// Completes the pending update: unscale, inf/NaN check, clip, optimiser step at the
    /// scheduled rate, update counter.
    pub fn finish_update(&mut self) -> Result<StepStats> {
        let Some(pend) = self.pending.take() else {
            return Err(CoreError::Config(
                "finish_update without accumulated micro-batches".into(),
            ));
        };
        let t0 = Instant::now();
        let k = self.step + 1;
        let lr = self.cfg.optim.lr * lr_lambda(k, &self.cfg.schedule);
        let scale = self.scaler.scale();
        let mut grads = pend.grads;
        if scale != 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = g.affine(1.0 / scale, 0.0)?;
            }
        }
        let norm = clip_grad_norm(&mut grads, self.cfg.clip_norm.unwrap_or(f64::INFINITY))?;
        let (Some(loss), Some(ce), Some(kl)) = (pend.loss, pend.ce, pend.kl) else {
            return Err(CoreError::Config(
                "finish_update without accumulated micro-batches".into(),
            ));
        };
        let dev = loss.device().clone();
        let norm = match norm {
            Some(n) => n.to_device(&dev)?,
            None => Tensor::new(0f32, &dev)?,
        };
        // The update's single host sync.
        let vals = Tensor::stack(&[&loss, &ce, &kl, &norm], 0)?.to_vec1::<f32>()?;
        let (loss, ce, kl, grad_norm) = (
            vals[0] as f64,
            vals[1] as f64,
            vals[2] as f64,
            vals[3] as f64,
        );
        let skipped = skip_update(&mut self.scaler, k, loss, grad_norm)?;
        if !skipped {
            self.opt.step(&grads, lr)?;
        }
        if self.cfg.sync_timing {
            dev.synchronize()?;
        }
        self.step = k;
        Ok(StepStats {
            step: k,
            lr,
            loss,
            ce,
            kl,
            grad_norm,
            loss_scale: scale,
            skipped,
            skipped_total: self.scaler.skipped(),
            micro_batches: pend.micro_batches,
            samples: pend.samples,
            forward_s: pend.forward_s,
            backward_s: pend.backward_s,
            optimizer_s: t0.elapsed().as_secs_f64(),
        })
    }
}
