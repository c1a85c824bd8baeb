//! Training over flat buffers: the update of the explicit engines (models that compute their
//! own gradients into one flat `f32` buffer, such as `rdrop_vit::engine`), written once in
//! [`FlatTrainer`] over an [`UpdateBackend`]: host buffers ([`FlatRDropModel`], the CPU engine)
//! or device buffers (the CUDA engine, which implements the trait in rdrop-vit).
//!
//! Parameters, gradients and the optimiser's moments each live in one flat buffer; a
//! [`FlatLayout`] names the views (checkpoint names and shapes), so the optimiser state still
//! exports as `momentum.<name>` / `exp_avg.<name>` / `exp_avg_sq.<name>` tensors and a
//! [`TrainState`] from either trainer loads into the other.
//!
//! One update (the same sequence and the same f32 arithmetic as [`crate::Trainer`]):
//! ```text
//! G = 0;  for each micro-batch j:  G += ∇(w_j · s · L_j)    (s: the f16 loss scale, else 1)
//! [G ← Σ_ranks G]                                            (data parallel)
//! G ← G / s;  total = √(Σ G²)                                (one pass, f64 partials)
//! f16: overflow (total not finite) → skip, scale ← scale/2   (LossScaler)
//! coef  = min(1, max_norm / (total + 1e-6))                  (torch clip_grad_norm_)
//! θ     = optimiser(θ, coef · G, lr = base_lr · lr_lambda(k)) (one pass per decay segment)
//! ```
//! The steady-state update of one process on the host allocates nothing (a data-parallel one
//! allocates its bucket list, a channel and the thread that sums the buckets, once per update).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rdrop_kernels::optim::{adamw_step, clip_coef, sgd_step, sum_squares, AdamWHyper, SgdHyper};

use crate::dist::Collective;
use crate::error::{CoreError, Result};
use crate::loss::LossConfig;
use crate::optim::{OptimConfig, OptimizerKind, OptimizerState, WeightDecayScope};
use crate::profile::Profile;
use crate::rng::{RngState, RowKey};
use crate::scaler::LossScaler;
use crate::schedule::lr_lambda;
use crate::split::UpdateSplit;
use crate::state::TrainState;
use crate::trainer::{restore_scaler, skip_update, Precision, StepStats, TrainConfig};

/// One named tensor inside a flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatView {
    /// The checkpoint name (e.g. `vit.encoder.layer.0.attention.attention.query.weight`).
    pub name: String,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// Offset of its first element in the flat buffer.
    pub offset: usize,
}

impl FlatView {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a tensor with no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element range in the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The named views of a flat buffer, in buffer order, without gaps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlatLayout {
    views: Vec<FlatView>,
    len: usize,
}

impl FlatLayout {
    /// An empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a view and returns its offset.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize]) -> usize {
        let offset = self.len;
        let v = FlatView {
            name: name.into(),
            shape: shape.to_vec(),
            offset,
        };
        self.len += v.len();
        self.views.push(v);
        offset
    }

    /// Total elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The views in buffer order.
    pub fn views(&self) -> &[FlatView] {
        &self.views
    }

    /// The view named `name`.
    pub fn get(&self, name: &str) -> Option<&FlatView> {
        self.views.iter().find(|v| v.name == name)
    }

    /// Maximal runs of consecutive views with the same weight-decay setting under `cfg`
    /// (`(range, decays)`): the optimiser makes one pass per run.
    pub fn decay_segments(&self, cfg: &OptimConfig) -> Vec<(std::ops::Range<usize>, bool)> {
        let mut out: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
        for v in &self.views {
            let decay = cfg.weight_decay > 0.0
                && match cfg.weight_decay_scope {
                    WeightDecayScope::All => true,
                    WeightDecayScope::RankAtLeast2 => v.shape.len() >= 2,
                };
            match out.last_mut() {
                Some((r, d)) if *d == decay && r.end == v.offset => r.end = v.offset + v.len(),
                _ => out.push((v.range(), decay)),
            }
        }
        out
    }

    /// The views of `buf` as CPU tensors, keyed `prefix + name`.
    pub fn export(&self, buf: &[f32], prefix: &str) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for v in &self.views {
            let t = Tensor::from_slice(&buf[v.range()], v.shape.as_slice(), &Device::Cpu)?;
            out.insert(format!("{prefix}{}", v.name), t);
        }
        Ok(out)
    }

    /// Copies `prefix + name` tensors of `src` (f32, matching shapes) into `buf`; returns how
    /// many views were found. A view missing from `src` is left as it is.
    pub fn import(
        &self,
        buf: &mut [f32],
        src: &BTreeMap<String, Tensor>,
        prefix: &str,
    ) -> Result<usize> {
        let mut found = 0;
        for v in &self.views {
            let key = format!("{prefix}{}", v.name);
            let Some(t) = src.get(&key) else { continue };
            if t.dims() != v.shape.as_slice() {
                return Err(CoreError::Config(format!(
                    "{key}: shape {:?}, expected {:?}",
                    t.dims(),
                    v.shape
                )));
            }
            let data = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            buf[v.range()].copy_from_slice(&data);
            found += 1;
        }
        Ok(found)
    }
}

/// One micro-batch of an update, as the trainer hands it to an engine: the images, their labels
/// and what keys their dropout masks and weighs their loss.
#[derive(Debug, Clone, Copy)]
pub struct MicroStep<'a> {
    /// Images `(m, …)`.
    pub x: &'a Tensor,
    /// Labels `(m,)`, `u32`.
    pub y: &'a Tensor,
    /// The 1-based update being computed (keys the dropout masks).
    pub update: u64,
    /// The micro-batch's offset in the update's global batch (keys the dropout masks).
    pub first_sample: usize,
    /// The objective.
    pub loss: &'a LossConfig,
    /// The factor on its gradient: `w_j`, times the loss scale in f16.
    pub weight: f64,
}

impl MicroStep<'_> {
    /// Checks that there is one label per image (`m` images) and writes the dropout row keys
    /// of the two passes into `rows`: rows `0..m` are pass 0, rows `m..2m` pass 1 of the same
    /// samples (one forward of `[x; x]`), keyed by their index in the global batch. Returns
    /// the update as the masks' 32-bit counter.
    pub fn mask_rows(&self, m: usize, rows: &mut Vec<RowKey>) -> Result<u32> {
        if self.y.dims() != [m] {
            return Err(CoreError::Config(format!(
                "labels of shape {:?} for {m} images",
                self.y.dims()
            )));
        }
        let update = u32::try_from(self.update)
            .map_err(|_| CoreError::Config(format!("update {} > 2^32", self.update)))?;
        rows.clear();
        for pass in 0..2 {
            rows.extend((0..m).map(|i| RowKey {
                sample: (self.first_sample + i) as u32,
                pass,
            }));
        }
        Ok(update)
    }
}

/// What one micro-batch contributed (host values).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MicroLoss {
    /// The micro-batch's objective (unweighted).
    pub loss: f64,
    /// Its cross-entropy term.
    pub ce: f64,
    /// Its symmetric KL term (before α).
    pub kl: f64,
    /// Seconds in the forward passes and the loss.
    pub forward_s: f64,
    /// Seconds in the backward.
    pub backward_s: f64,
}

/// A model that computes its own gradients into flat host buffers (the CPU explicit engine);
/// every such model is an [`UpdateBackend`].
pub trait FlatRDropModel {
    /// The names and shapes of the flat parameter buffer.
    fn layout(&self) -> &FlatLayout;
    /// Parameters (mutable, for the optimiser) and the accumulated gradients (mutable, for the
    /// data-parallel all-reduce).
    fn params_and_grads(&mut self) -> (&mut [f32], &mut [f32]);
    /// Sets every gradient to zero (start of an update).
    fn zero_grads(&mut self);
    /// Two training passes of the micro-batch, the R-Drop loss, and its backward: adds
    /// `mb.weight · ∇loss` to the gradients.
    fn accumulate(&mut self, mb: &MicroStep<'_>) -> Result<MicroLoss>;
    /// The dropout generator's state (saved in checkpoints).
    fn rng_state(&self) -> RngState;

    /// Takes a checkpoint's dropout state. Default: a model with no dropout of its own only
    /// checks that the masks can be reproduced.
    fn set_rng_state(&mut self, s: &RngState) -> Result<()> {
        Ok(s.check_generator()?)
    }

    /// Offsets of the gradient buffer at which the backward has finished everything above,
    /// in the order it reaches them (strictly descending, the last one 0): the places a
    /// gradient bucket may close ([`crate::dist::bucket`]). Default `[0]`: the buffer is final
    /// only when the backward ends.
    fn grad_ready_cuts(&self) -> Vec<usize> {
        vec![0]
    }

    /// Starts (`true`) or stops recording where the micro-batches' time goes. Default: the
    /// model keeps no profile.
    fn set_profiling(&mut self, _on: bool) {}

    /// The op groups of the micro-batches accumulated since the last take ([`Profile`]);
    /// empty when not profiling.
    fn take_profile(&mut self) -> Profile {
        Profile::default()
    }

    /// [`FlatRDropModel::accumulate`], handing each bucket `grads[cuts_i .. cuts_{i−1})` to
    /// `ready` as soon as the backward has written its last value (`cuts`: a subset of
    /// [`FlatRDropModel::grad_ready_cuts`] ending at 0, see [`crate::dist::bucket_cuts`]),
    /// while the backward goes on below it. Nothing is handed when it fails before the
    /// backward. The default runs the whole backward first, then hands the buckets in order.
    fn accumulate_overlapped<'g>(
        &'g mut self,
        mb: &MicroStep<'_>,
        cuts: &[usize],
        ready: &mut dyn FnMut(&'g mut [f32]),
    ) -> Result<MicroLoss> {
        let l = self.accumulate(mb)?;
        let (_, mut rest) = self.params_and_grads();
        for &c in cuts {
            let c = c.min(rest.len());
            let (lo, hi) = rest.split_at_mut(c);
            ready(hi);
            rest = lo;
        }
        Ok(l)
    }
}

/// The engine side of one update ([`FlatTrainer`]): its parameters, gradients and optimiser
/// moments live wherever the engine keeps them (host memory for a [`FlatRDropModel`], the
/// device for the CUDA engine, rdrop-vit's `engine::cuda`); the trainer drives
/// ```text
/// zero_grads; accumulate (or accumulate_reducing, the last micro-batch) × accum;
/// [reduce_grads]; grad_norm; step
/// ```
/// and exports the state through [`UpdateBackend::optimizer_state`] in the checkpoint format.
pub trait UpdateBackend {
    /// The names and shapes of the flat parameter (and gradient) buffer.
    fn layout(&self) -> &FlatLayout;
    /// An error when the backend cannot train at `precision`.
    fn check_precision(&self, precision: Precision) -> Result<()>;
    /// Where gradient buckets may close ([`FlatRDropModel::grad_ready_cuts`]).
    fn grad_ready_cuts(&self) -> Vec<usize>;
    /// Starts or stops recording the op groups; `sync` asks for host timings that are honest
    /// (each phase drained before the clock is read).
    fn set_profiling(&mut self, on: bool, sync: bool);
    /// The op groups since the last take ([`FlatRDropModel::take_profile`]).
    fn take_profile(&mut self) -> Profile;
    /// Waits for the work queued so far (default: nothing is queued).
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
    /// `G = 0`.
    fn zero_grads(&mut self) -> Result<()>;
    /// `G += ∇(mb.weight · L)` ([`FlatRDropModel::accumulate`]).
    fn accumulate(&mut self, mb: &MicroStep<'_>) -> Result<MicroLoss>;
    /// [`UpdateBackend::accumulate`] with the buckets `cuts` of `G` summed over the ranks while
    /// the backward runs; also returns the seconds the host then waited for the last sums.
    fn accumulate_reducing(
        &mut self,
        mb: &MicroStep<'_>,
        collective: &dyn Collective,
        cuts: &[usize],
    ) -> Result<(MicroLoss, f64)>;
    /// `G ← Σ_ranks G`, in place.
    fn reduce_grads(&mut self, collective: &dyn Collective) -> Result<()>;
    /// `G ← inv_scale · G` (the f16 loss scale undone) and `‖G‖` (f64 partials); a backend
    /// that clips on its device also leaves `clip_coef(‖G‖, max_norm)` there.
    fn grad_norm(&mut self, inv_scale: f32, max_norm: Option<f64>) -> Result<f64>;
    /// `θ ← opt(θ, coef · G, lr)`: one step of `opt` (its configuration, segments and step
    /// count; the moments are the backend's). `coef` is `clip_coef(‖G‖, max_norm)`.
    fn step(&mut self, opt: &mut FlatOptimizer, lr: f64, coef: f32) -> Result<()>;
    /// The dropout generator's state.
    fn rng_state(&self) -> RngState;
    /// Takes a checkpoint's dropout state.
    fn set_rng_state(&mut self, s: &RngState) -> Result<()>;
    /// `opt`'s state with the backend's moments, in [`FlatOptimizer::state`]'s format.
    fn optimizer_state(&self, opt: &FlatOptimizer) -> Result<OptimizerState>;
    /// Loads `s` into `opt` and the backend's moments.
    fn load_optimizer_state(&mut self, opt: &mut FlatOptimizer, s: &OptimizerState) -> Result<()>;
}

impl<M: FlatRDropModel + ?Sized> UpdateBackend for M {
    fn layout(&self) -> &FlatLayout {
        FlatRDropModel::layout(self)
    }

    fn check_precision(&self, precision: Precision) -> Result<()> {
        if precision != Precision::F32 {
            return Err(CoreError::Config(format!(
                "the explicit engine trains in f32 on CPU; precision {precision:?} needs --engine autograd"
            )));
        }
        Ok(())
    }

    fn grad_ready_cuts(&self) -> Vec<usize> {
        FlatRDropModel::grad_ready_cuts(self)
    }

    fn set_profiling(&mut self, on: bool, _sync: bool) {
        FlatRDropModel::set_profiling(self, on)
    }

    fn take_profile(&mut self) -> Profile {
        FlatRDropModel::take_profile(self)
    }

    fn zero_grads(&mut self) -> Result<()> {
        FlatRDropModel::zero_grads(self);
        Ok(())
    }

    fn accumulate(&mut self, mb: &MicroStep<'_>) -> Result<MicroLoss> {
        FlatRDropModel::accumulate(self, mb)
    }

    /// A scoped thread makes the collective calls (every rank the same buckets in the same
    /// order) on the slices the model hands over.
    fn accumulate_reducing(
        &mut self,
        mb: &MicroStep<'_>,
        collective: &dyn Collective,
        cuts: &[usize],
    ) -> Result<(MicroLoss, f64)> {
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel::<&mut [f32]>();
            let comm = s.spawn(move || -> Result<usize> {
                let mut n = 0;
                for bucket in rx {
                    collective.all_reduce_sum(bucket)?;
                    n += 1;
                }
                Ok(n)
            });
            // A failed reduction ends the thread: later sends fail, and its error is reported
            // below.
            let out = self.accumulate_overlapped(mb, cuts, &mut |bucket| {
                let _ = tx.send(bucket);
            });
            drop(tx);
            let t = Instant::now();
            let reduced = comm.join().map_err(|_| {
                CoreError::Config("the thread summing the gradient buckets panicked".into())
            })?;
            let mut out = out?;
            // The sums still running when the backward ends: the part not overlapped.
            let wait = t.elapsed().as_secs_f64();
            out.backward_s += wait;
            let n = reduced?;
            if n != cuts.len() {
                return Err(CoreError::Config(format!(
                    "the backward handed {n} gradient buckets of {}",
                    cuts.len()
                )));
            }
            Ok((out, wait))
        })
    }

    fn reduce_grads(&mut self, collective: &dyn Collective) -> Result<()> {
        Ok(collective.all_reduce_sum(self.params_and_grads().1)?)
    }

    /// On the host the scale is always 1 (f32 only, [`UpdateBackend::check_precision`]);
    /// clipping is folded into the step.
    fn grad_norm(&mut self, inv_scale: f32, _max_norm: Option<f64>) -> Result<f64> {
        debug_assert_eq!(inv_scale, 1.0, "the host engine trains in f32");
        Ok(sum_squares(self.params_and_grads().1).sqrt())
    }

    fn step(&mut self, opt: &mut FlatOptimizer, lr: f64, coef: f32) -> Result<()> {
        let (params, grads) = self.params_and_grads();
        opt.step(params, grads, lr, coef);
        Ok(())
    }

    fn rng_state(&self) -> RngState {
        FlatRDropModel::rng_state(self)
    }

    fn set_rng_state(&mut self, s: &RngState) -> Result<()> {
        FlatRDropModel::set_rng_state(self, s)
    }

    fn optimizer_state(&self, opt: &FlatOptimizer) -> Result<OptimizerState> {
        opt.state()
    }

    fn load_optimizer_state(&mut self, opt: &mut FlatOptimizer, s: &OptimizerState) -> Result<()> {
        opt.load_state(s)
    }
}

/// SGD-momentum / AdamW over a flat buffer, PyTorch semantics (as [`crate::Optimizer`]).
#[derive(Debug, Clone)]
pub struct FlatOptimizer {
    cfg: OptimConfig,
    layout: FlatLayout,
    segments: Vec<(std::ops::Range<usize>, bool)>,
    /// SGD momentum buffer or AdamW's first moment (empty until first needed).
    m: Vec<f32>,
    /// AdamW's second moment.
    v: Vec<f32>,
    /// Updates applied (every parameter is stepped together here).
    steps: u64,
}

impl FlatOptimizer {
    /// An optimiser for the parameters described by `layout`.
    pub fn new(cfg: OptimConfig, layout: FlatLayout) -> Result<Self> {
        cfg.validate().map_err(CoreError::Config)?;
        let segments = layout.decay_segments(&cfg);
        Ok(Self {
            cfg,
            layout,
            segments,
            m: Vec::new(),
            v: Vec::new(),
            steps: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// One update with learning rate `lr` of `params` from `grad_scale · grads`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64, grad_scale: f32) {
        let n = self.layout.len();
        assert!(
            params.len() == n && grads.len() == n,
            "flat optimiser: sizes"
        );
        let first = self.steps == 0;
        self.steps += 1;
        let cfg = self.cfg;
        match cfg.kind {
            OptimizerKind::Sgd => {
                if cfg.momentum != 0.0 && self.m.len() != n {
                    self.m = vec![0.0; n];
                }
                for (r, decay) in &self.segments {
                    let h = SgdHyper {
                        lr: lr as f32,
                        momentum: cfg.momentum as f32,
                        nesterov: cfg.nesterov,
                        weight_decay: if *decay { cfg.weight_decay as f32 } else { 0.0 },
                    };
                    let buf: &mut [f32] = if cfg.momentum != 0.0 {
                        &mut self.m[r.clone()]
                    } else {
                        &mut []
                    };
                    sgd_step(
                        &mut params[r.clone()],
                        &grads[r.clone()],
                        buf,
                        first,
                        grad_scale,
                        &h,
                    );
                }
            }
            OptimizerKind::AdamW => {
                if self.m.len() != n {
                    self.m = vec![0.0; n];
                    self.v = vec![0.0; n];
                }
                for (r, decay) in &self.segments {
                    let h = AdamWHyper {
                        lr: lr as f32,
                        beta1: cfg.beta1 as f32,
                        beta2: cfg.beta2 as f32,
                        eps: cfg.eps as f32,
                        weight_decay: if *decay { cfg.weight_decay as f32 } else { 0.0 },
                    };
                    adamw_step(
                        &mut params[r.clone()],
                        &grads[r.clone()],
                        &mut self.m[r.clone()],
                        &mut self.v[r.clone()],
                        self.steps,
                        grad_scale,
                        &h,
                    );
                }
            }
        }
    }

    fn names(&self) -> (&'static str, &'static str) {
        match self.cfg.kind {
            OptimizerKind::Sgd => ("momentum", "unused"),
            OptimizerKind::AdamW => ("exp_avg", "exp_avg_sq"),
        }
    }

    /// The state in [`crate::Optimizer`]'s format (named tensors, per-parameter step counts).
    pub fn state(&self) -> Result<OptimizerState> {
        let mut s = OptimizerState {
            kind: self.cfg.kind,
            ..Default::default()
        };
        for v in self.layout.views() {
            s.param_steps.insert(v.name.clone(), self.steps);
        }
        let (mn, vn) = self.names();
        if !self.m.is_empty() {
            s.tensors
                .extend(self.layout.export(&self.m, &format!("{mn}."))?);
        }
        if !self.v.is_empty() {
            s.tensors
                .extend(self.layout.export(&self.v, &format!("{vn}."))?);
        }
        Ok(s)
    }

    /// Restores a state exported by either optimiser for the same parameters.
    pub fn load_state(&mut self, s: &OptimizerState) -> Result<()> {
        if s.kind != self.cfg.kind {
            return Err(CoreError::Config(format!(
                "optimizer state is for {:?}, the configuration says {:?}",
                s.kind, self.cfg.kind
            )));
        }
        let mut steps = None;
        for v in self.layout.views() {
            let st = s.param_steps.get(&v.name).copied().unwrap_or(0);
            match steps {
                None => steps = Some(st),
                Some(prev) if prev != st => {
                    return Err(CoreError::Config(format!(
                        "optimizer state: {} was stepped {st} times, other parameters {prev}; \
                         the flat optimiser steps every parameter together",
                        v.name
                    )))
                }
                _ => {}
            }
        }
        let steps = steps.unwrap_or(0);
        let (mn, vn) = self.names();
        let n = self.layout.len();
        let known: std::collections::HashSet<String> = self
            .layout
            .views()
            .iter()
            .flat_map(|v| [format!("{mn}.{}", v.name), format!("{vn}.{}", v.name)])
            .collect();
        if let Some(extra) = s.tensors.keys().find(|k| !known.contains(*k)) {
            return Err(CoreError::Config(format!(
                "optimizer state has a tensor for an unknown parameter: {extra}"
            )));
        }
        let needs_m = self.cfg.kind == OptimizerKind::AdamW || self.cfg.momentum != 0.0;
        let mut m = vec![0.0; if needs_m && steps > 0 { n } else { 0 }];
        if !m.is_empty() {
            let found = self.layout.import(&mut m, &s.tensors, &format!("{mn}."))?;
            if found != self.layout.views().len() {
                return Err(CoreError::Config(format!(
                    "optimizer state lacks {} of {} {mn} tensors (stepped {steps} times)",
                    self.layout.views().len() - found,
                    self.layout.views().len()
                )));
            }
        }
        let mut v = Vec::new();
        if self.cfg.kind == OptimizerKind::AdamW && steps > 0 {
            v = vec![0.0; n];
            let found = self.layout.import(&mut v, &s.tensors, &format!("{vn}."))?;
            if found != self.layout.views().len() {
                return Err(CoreError::Config(format!(
                    "optimizer state lacks {vn} tensors (stepped {steps} times)"
                )));
            }
        }
        self.m = m;
        self.v = v;
        self.steps = steps;
        Ok(())
    }
}

impl FlatOptimizer {
    /// The weight-decay segments of the buffer (`(range, decays)`), one optimiser pass each.
    pub fn segments(&self) -> &[(std::ops::Range<usize>, bool)] {
        &self.segments
    }

    /// The raw state: the momentum buffer or AdamW's first moment, AdamW's second moment
    /// (each empty until first used) and the updates applied. An engine that keeps the moments
    /// elsewhere (on a GPU) exports them through a `FlatOptimizer` holding these, so its
    /// checkpoints are [`FlatOptimizer::state`]'s format exactly.
    pub fn parts(&self) -> (&[f32], &[f32], u64) {
        (&self.m, &self.v, self.steps)
    }

    /// Sets the raw state (see [`FlatOptimizer::parts`]); each buffer must be empty or hold
    /// one value per parameter.
    pub fn set_parts(&mut self, m: Vec<f32>, v: Vec<f32>, steps: u64) -> Result<()> {
        let n = self.layout.len();
        for (what, len) in [("first moment", m.len()), ("second moment", v.len())] {
            if len != 0 && len != n {
                return Err(CoreError::Config(format!(
                    "flat optimiser {what}: {len} values for {n} parameters"
                )));
            }
        }
        self.m = m;
        self.v = v;
        self.steps = steps;
        Ok(())
    }
}

/// The update of the explicit engines, written once over an [`UpdateBackend`]: accumulation,
/// the data-parallel sums, the f16 loss scaler (an option: enabled at precision f16, on
/// backends that train in it), clipping, schedule and the optimiser.
#[derive(Debug)]
pub struct FlatTrainer {
    cfg: TrainConfig,
    /// Configuration, segments and step count; the moments are the backend's
    /// ([`UpdateBackend::step`]).
    opt: FlatOptimizer,
    scaler: LossScaler,
    step: u64,
    profiling: bool,
    profile: Profile,
}

impl FlatTrainer {
    /// A trainer at update 0 for `backend`; f16 gets dynamic loss scaling.
    pub fn new<B: UpdateBackend + ?Sized>(cfg: TrainConfig, backend: &B) -> Result<Self> {
        cfg.validate()?;
        backend.check_precision(cfg.precision)?;
        Ok(Self {
            opt: FlatOptimizer::new(cfg.optim, backend.layout().clone())?,
            scaler: LossScaler::new(cfg.scaler, cfg.precision == Precision::F16),
            cfg,
            step: 0,
            profiling: false,
            profile: Profile::default(),
        })
    }

    /// A trainer resumed from `state` (optimiser moments into `backend`, loss scaler, update
    /// count, the backend's dropout state). `state` may come from any of the trainers.
    pub fn restore<B: UpdateBackend + ?Sized>(
        cfg: TrainConfig,
        backend: &mut B,
        state: &TrainState,
    ) -> Result<Self> {
        let mut t = Self::new(cfg, backend)?;
        restore_scaler(&mut t.scaler, state, cfg.precision)?;
        backend.set_rng_state(&state.rng)?;
        backend.load_optimizer_state(&mut t.opt, &state.optimizer)?;
        t.step = state.step;
        Ok(t)
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Updates completed so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The current loss scale (1 unless f16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.scale()
    }

    /// Records (`true`) where each update's time goes: the backend's op groups
    /// ([`UpdateBackend::take_profile`]) plus `grad_reduce` and `optimizer` (zeroing,
    /// un-scaling, norm, clipping and the step, timed on the host after draining the backend).
    /// Read with [`FlatTrainer::take_profile`].
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        self.profile = Profile::default();
    }

    /// The profile of the updates since the last take (summed; empty when not profiling).
    pub fn take_profile(&mut self) -> Profile {
        std::mem::take(&mut self.profile)
    }

    /// The checkpointable state, in the same format as [`crate::Trainer::state`].
    pub fn state<B: UpdateBackend + ?Sized>(
        &self,
        backend: &B,
        epoch: u64,
        batch_index: u64,
    ) -> Result<TrainState> {
        Ok(TrainState {
            step: self.step,
            epoch,
            batch_index,
            rng: backend.rng_state(),
            scaler: self.scaler.state(),
            optimizer: backend.optimizer_state(&self.opt)?,
            extra: serde_json::Value::Null,
        })
    }

    /// One full update over `micro_batches` (`x`, labels `y` as `u32`), which must number
    /// `accum_steps`. Errors: [`CoreError::NonFinite`] when the loss or the gradient norm is
    /// not finite outside f16 (the parameters are left unchanged); in f16 such an update is
    /// skipped and the scale backs off.
    pub fn update<B: UpdateBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        micro_batches: &[(Tensor, Tensor)],
    ) -> Result<StepStats> {
        self.update_with(backend, micro_batches, None)
    }

    /// One data-parallel update: `micro_batches` are this rank's share of the global batch
    /// (rank `r` of `N` holds global samples `r·B/N ..` in order, cut into `accum_steps`
    /// micro-batches; [`crate::dist::shard()`]); every rank must hold as many samples. With
    /// `n` local and `B = N·n` global samples:
    /// ```text
    /// first_sample(j) = r·n + Σ_{i<j} m_i                  (masks keyed by global index)
    /// w_j = m_j / B (mean)   or   1 / (accum · N) (reference)
    /// G   = Σ_ranks Σ_j ∇(w_j · L_j)                       (UpdateBackend::reduce_grads)
    /// (loss, ce, kl, n) summed over ranks                  (collective.all_reduce_f64)
    /// ```
    /// then the norm, clip and step of [`FlatTrainer::update`] on the summed `G`, identical on
    /// every rank (in f16 every rank sees the same sums, so all skip together). So `N` ranks at
    /// accumulation `A` compute the single-process update at accumulation `N·A` over the same
    /// samples (the same up to float summation order; in `mean` mode also the update at
    /// accumulation `A`). `StepStats::samples` is `B`.
    /// With `grad_bucket_mb > 0` (the same on every rank) the sum of `G` runs in buckets during
    /// the last micro-batch's backward ([`UpdateBackend::accumulate_reducing`]), overlapped
    /// with it; the wait for the last bucket counts in `backward_s`. With `grad_bucket_mb = 0`
    /// it runs after the backward and counts in `optimizer_s`. With a world of one it computes
    /// [`FlatTrainer::update`] (the reductions still run).
    pub fn update_distributed<B: UpdateBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        micro_batches: &[(Tensor, Tensor)],
        collective: &dyn Collective,
    ) -> Result<StepStats> {
        self.update_with(backend, micro_batches, Some(collective))
    }

    fn update_with<B: UpdateBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        micro_batches: &[(Tensor, Tensor)],
        collective: Option<&dyn Collective>,
    ) -> Result<StepStats> {
        let split = UpdateSplit::new(
            micro_batches,
            self.cfg.accum_steps,
            self.cfg.loss.mode,
            collective,
        )?;
        let k = self.step + 1;
        let scale = self.scaler.scale();
        // Buckets (data parallel with grad_bucket_mb > 0): reduced during the last backward.
        let cuts = collective.and_then(|_| {
            let ready = backend.grad_ready_cuts();
            crate::dist::cuts_for(self.cfg.grad_bucket_mb, &ready, backend.layout().len())
        });
        let prof = self.profiling;
        let sync = self.cfg.sync_timing || prof;
        backend.set_profiling(prof, sync);
        let t0 = Instant::now();
        backend.zero_grads()?;
        if prof {
            backend.synchronize()?;
        }
        let zero_s = t0.elapsed().as_secs_f64();
        let (mut loss, mut ce, mut kl) = (0f64, 0f64, 0f64);
        let (mut fwd, mut bwd, mut reduce_s) = (0f64, 0f64, 0f64);
        let last = micro_batches.len().saturating_sub(1);
        for (j, ((x, y), &(first, w))) in micro_batches.iter().zip(&split.micro).enumerate() {
            let mb = MicroStep {
                x,
                y,
                update: k,
                first_sample: first,
                loss: &self.cfg.loss,
                weight: w * scale,
            };
            let l = match (collective, &cuts) {
                (Some(c), Some(cuts)) if j == last => {
                    let (l, wait) = backend.accumulate_reducing(&mb, c, cuts)?;
                    reduce_s += wait;
                    l
                }
                _ => backend.accumulate(&mb)?,
            };
            loss += w * l.loss;
            ce += w * l.ce;
            kl += w * l.kl;
            fwd += l.forward_s;
            bwd += l.backward_s;
        }
        let t1 = Instant::now();
        // With a collective the reductions run even for a world of one (identities then), so
        // that a one-rank launch exercises the distributed path.
        if let Some(c) = collective {
            if cuts.is_none() {
                backend.reduce_grads(c)?;
            }
            [loss, ce, kl] = split.reduce_stats(c, [loss, ce, kl])?;
            if prof {
                backend.synchronize()?;
            }
        }
        reduce_s += t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let lr = self.cfg.optim.lr * lr_lambda(k, &self.cfg.schedule);
        let grad_norm = backend.grad_norm((1.0 / scale) as f32, self.cfg.clip_norm)?;
        let skipped = skip_update(&mut self.scaler, k, loss, grad_norm)?;
        if !skipped {
            let coef = match self.cfg.clip_norm {
                Some(max) => clip_coef(grad_norm, max),
                None => 1.0,
            };
            backend.step(&mut self.opt, lr, coef)?;
        }
        if sync {
            backend.synchronize()?;
        }
        self.step = k;
        if prof {
            let p = backend.take_profile();
            self.profile.merge(&p);
            let n = backend.layout().len() as f64;
            // Reduction: the gradient once in, once out (f32). Optimiser: the norm reads g;
            // the step reads p, g, the moment and writes p and the moment (SGD momentum: ~4
            // flops per value, the norm 2).
            if collective.is_some() {
                self.profile.add("grad_reduce", reduce_s * 1e3, n, 8.0 * n);
            }
            self.profile.add(
                "optimizer",
                (zero_s + t2.elapsed().as_secs_f64()) * 1e3,
                6.0 * n,
                4.0 * n * 7.0,
            );
        }
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
            micro_batches: micro_batches.len(),
            samples: split.total,
            forward_s: fwd,
            backward_s: bwd,
            optimizer_s: t1.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_views_segments_and_round_trip() -> Result<()> {
        let mut l = FlatLayout::new();
        l.push("a.weight", &[2, 3]);
        l.push("a.bias", &[2]);
        l.push("b.weight", &[1, 2]);
        assert_eq!(l.len(), 10);
        assert_eq!(l.get("a.bias").map(|v| v.range()), Some(6..8));
        let cfg = OptimConfig {
            weight_decay: 0.1,
            weight_decay_scope: WeightDecayScope::RankAtLeast2,
            ..OptimConfig::default()
        };
        assert_eq!(
            l.decay_segments(&cfg),
            vec![(0..6, true), (6..8, false), (8..10, true)]
        );
        assert_eq!(
            l.decay_segments(&OptimConfig::default()),
            vec![(0..10, false)]
        );
        let buf: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let t = l.export(&buf, "m.")?;
        let mut back = vec![0f32; 10];
        assert_eq!(l.import(&mut back, &t, "m.")?, 3);
        assert_eq!(back, buf);
        Ok(())
    }

    #[test]
    fn parts_round_trip_through_the_checkpoint_format() -> Result<()> {
        let mut l = FlatLayout::new();
        l.push("w", &[2, 2]);
        l.push("b", &[2]);
        let cfg = OptimConfig {
            kind: OptimizerKind::AdamW,
            ..OptimConfig::default()
        };
        let mut a = FlatOptimizer::new(cfg, l.clone())?;
        let mut p = vec![1f32, -2., 3., 0.5, 0.25, -1.];
        let g = vec![0.1f32, 0.2, -0.3, 0.4, -0.5, 0.6];
        a.step(&mut p, &g, 1e-2, 1.0);
        a.step(&mut p, &g, 1e-2, 0.5);
        // Moments taken out (as a GPU engine downloads them) and put into a fresh optimiser
        // export the same state, and load back into the same parts.
        let (m, v, steps) = a.parts();
        assert_eq!((m.len(), v.len(), steps), (6, 6, 2));
        let mut b = FlatOptimizer::new(cfg, l.clone())?;
        b.set_parts(m.to_vec(), v.to_vec(), steps)?;
        let (sa, sb) = (a.state()?, b.state()?);
        assert_eq!(sa.param_steps, sb.param_steps);
        assert_eq!(sa.tensors.len(), 4);
        for (k, t) in &sa.tensors {
            let u = &sb.tensors[k];
            assert_eq!(
                t.flatten_all()?.to_vec1::<f32>()?,
                u.flatten_all()?.to_vec1::<f32>()?,
                "{k}"
            );
        }
        let mut c = FlatOptimizer::new(cfg, l)?;
        c.load_state(&sa)?;
        assert_eq!(c.parts(), a.parts());
        assert!(c.set_parts(vec![0.0; 5], vec![], 1).is_err());
        Ok(())
    }
}
