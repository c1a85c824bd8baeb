//! The explicit training engine: the ViT's forward and hand-derived backward over flat
//! parameter/gradient buffers and activations planned once per batch size (after karpathy's
//! llm.c). The candle-autograd model ([`crate::VisionTransformer`]) is its reference: both draw
//! the same dropout masks (Philox keys, [`crate::sites`]) and tests hold logits and every gradient
//! together.
//!
//! - [`params`]: the flat layout (checkpoint names, fused q/k/v), each tensor named once
//!   (`Offsets`: per layer, views of any buffer), copies to and from the model;
//! - [`plan`]: the saved activations and scratch, each buffer declared once in a table
//!   (`plan_table!`: the plan's struct, allocation and bytes), on both backends;
//! - [`forward`], [`backward`]: the passes, block by block;
//! - [`Engine`]: the composition, an R-Drop micro-batch step ([`rdrop_core::FlatRDropModel`])
//!   and inference.
//!
//! Covers every architecture [`ViTConfig`] describes, on CPU in f32; [`cuda`] runs it on a GPU. After the first step at
//! a given micro-batch, a step allocates nothing of its own.

pub(crate) mod backward;
pub(crate) mod cost;
pub mod cuda;
pub mod explicit;
pub(crate) mod forward;
pub mod kind;
pub(crate) mod params;
pub(crate) mod plan;

use candle_core::{Device, Storage, Tensor};
use rdrop_core::{FlatLayout, FlatRDropModel, MicroLoss, MicroStep, Profile, RngState, Stopwatch};
use rdrop_kernels::dropout::RowKey;
use rdrop_kernels::loss::rdrop_loss;

use crate::config::ViTConfig;
use crate::error::{Result, VitError};
use crate::model::VisionTransformer;
use forward::Masks;
pub use kind::EngineKind;
use params::Offsets;
use plan::Plan;

/// The batch size of images `x (B, C, S, S)` for an engine of `cfg` (both engines): an error
/// naming the shape when it does not match the model, or when the batch is empty.
pub(crate) fn check_images(cfg: &ViTConfig, x: &Tensor) -> Result<usize> {
    let (b, c, h, w) = x.dims4()?;
    let s = cfg.image_size;
    if c != cfg.num_channels || h != s || w != s {
        return Err(VitError::Config(format!(
            "input of shape {:?} does not match the model ({} channels, {s}×{s} pixels)",
            x.dims(),
            cfg.num_channels
        )));
    }
    if b == 0 {
        return Err(VitError::Config("an empty batch of images".into()));
    }
    Ok(b)
}

/// The explicit engine of one ViT: parameters and gradients in flat buffers.
#[derive(Debug)]
pub struct Engine {
    cfg: ViTConfig,
    layout: FlatLayout,
    off: Offsets,
    params: Vec<f32>,
    grads: Vec<f32>,
    plan: Option<Plan>,
    rng: RngState,
    rows: Vec<RowKey>,
    /// Laps of the op groups while profiling.
    sw: Stopwatch,
}

/// Borrows the data of a contiguous CPU tensor of dtype `T` without copying (converts first
/// when the tensor is elsewhere or of another dtype).
fn with_cpu<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = if t.dtype() == T::DTYPE && t.device().is_cpu() && t.is_contiguous() {
        t.clone()
    } else {
        t.to_device(&Device::Cpu)?
            .to_dtype(T::DTYPE)?
            .contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(VitError::Config("the engine runs on CPU tensors".into()));
    };
    let all = cpu.as_slice::<T>()?;
    let start = layout.start_offset();
    Ok(f(&all[start..start + t.elem_count()]))
}

/// The plan for `rows` rows (training: every block's activations; inference: one slot),
/// re-planned only when the shape changes.
fn ensure_plan<'a>(
    slot: &'a mut Option<Plan>,
    cfg: &ViTConfig,
    rows: usize,
    train: bool,
) -> &'a mut Plan {
    let slots = if train { cfg.num_layers } else { 1 };
    if !slot
        .as_ref()
        .is_some_and(|p| p.rows == rows && p.layers.len() == slots && p.train == train)
    {
        *slot = None; // free the old plan before allocating the new one
    }
    slot.get_or_insert_with(|| Plan::new(cfg, rows, train))
}

impl Engine {
    /// An engine holding a copy of `model`'s parameters (CPU, f32).
    pub fn from_model(model: &VisionTransformer) -> Result<Self> {
        let cfg = model.config().clone();
        let (layout, off) = params::layout(&cfg);
        let mut p = vec![0f32; layout.len()];
        params::read_from_model(&layout, model, &mut p)?;
        Ok(Self {
            grads: vec![0f32; layout.len()],
            params: p,
            layout,
            off,
            plan: None,
            rng: model.rng().state(),
            rows: Vec::new(),
            sw: Stopwatch::new(false),
            cfg,
        })
    }

    /// Writes the engine's parameters into `model` (to save it with the model's writers).
    pub fn write_to(&self, model: &VisionTransformer) -> Result<()> {
        params::write_to_model(&self.layout, &self.params, model)
    }

    /// The architecture.
    pub fn config(&self) -> &ViTConfig {
        &self.cfg
    }

    /// The flat parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The accumulated gradients (same layout as the parameters).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// Sets the dropout generator's state (resume).
    pub fn set_rng_state(&mut self, s: &RngState) -> Result<()> {
        s.check_generator()?;
        self.rng = s.clone();
        Ok(())
    }

    /// Bytes of activations and scratch currently planned.
    pub fn plan_bytes(&self) -> usize {
        self.plan.as_ref().map_or(0, Plan::bytes)
    }

    fn check_images(&self, x: &Tensor) -> Result<usize> {
        check_images(&self.cfg, x)
    }

    /// Logits `(B, classes)` of images `x (B, C, S, S)` in eval mode (no dropout). Uses an
    /// inference plan (one block's activations, reused by every block).
    pub fn forward_eval(&mut self, x: &Tensor) -> Result<Tensor> {
        self.forward_logits(x, 0, &[], false)
    }

    /// Training-mode logits `(B, classes)` with the masks of `update` and `rows` (one per image:
    /// sample index in the update's batch and R-Drop pass).
    pub fn forward_train(&mut self, x: &Tensor, update: u32, rows: &[RowKey]) -> Result<Tensor> {
        self.forward_logits(x, update, rows, true)
    }

    fn forward_logits(
        &mut self,
        x: &Tensor,
        update: u32,
        rows: &[RowKey],
        train: bool,
    ) -> Result<Tensor> {
        let b = self.check_images(x)?;
        if train && rows.len() != b {
            return Err(VitError::Config(format!(
                "{} row keys for {b} images",
                rows.len()
            )));
        }
        let plan = ensure_plan(&mut self.plan, &self.cfg, b, train);
        let masks = Masks {
            seed: self.rng.seed,
            update,
            rows,
            train,
        };
        with_cpu(x, |img: &[f32]| {
            forward::forward(
                &self.cfg,
                &self.params,
                &self.off,
                plan,
                img,
                false,
                &masks,
                &mut Stopwatch::new(false),
            )
        })?;
        Ok(Tensor::from_slice(
            &plan.logits,
            (b, self.cfg.num_classes),
            &Device::Cpu,
        )?)
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }
}

impl FlatRDropModel for Engine {
    fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    fn params_and_grads(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.params, &mut self.grads)
    }

    fn zero_grads(&mut self) {
        Engine::zero_grads(self)
    }

    fn accumulate(&mut self, mb: &MicroStep<'_>) -> rdrop_core::Result<MicroLoss> {
        self.accumulate_overlapped(mb, &[], &mut |_| {})
    }

    fn rng_state(&self) -> RngState {
        self.rng.clone()
    }

    fn set_rng_state(&mut self, s: &RngState) -> rdrop_core::Result<()> {
        Ok(Engine::set_rng_state(self, s)?)
    }

    fn grad_ready_cuts(&self) -> Vec<usize> {
        backward::ready_cuts(&self.off)
    }

    fn set_profiling(&mut self, on: bool) {
        if on != self.sw.is_on() {
            self.sw.set_on(on);
        }
    }

    fn take_profile(&mut self) -> Profile {
        self.sw.take()
    }

    fn accumulate_overlapped<'g>(
        &'g mut self,
        mb: &MicroStep<'_>,
        cuts: &[usize],
        ready: &mut dyn FnMut(&'g mut [f32]),
    ) -> rdrop_core::Result<MicroLoss> {
        let (x, y, loss, weight) = (mb.x, mb.y, mb.loss, mb.weight);
        let m = self.check_images(x)?;
        let update = mb.mask_rows(m, &mut self.rows)?;
        let classes = self.cfg.num_classes;
        let t0 = std::time::Instant::now();
        self.sw.start();
        let plan = ensure_plan(&mut self.plan, &self.cfg, 2 * m, true);
        let masks = Masks {
            seed: self.rng.seed,
            update,
            rows: &self.rows,
            train: true,
        };
        let (cfg, off, params, sw) = (&self.cfg, &self.off, &self.params, &mut self.sw);
        // The images once: the second pass's patch rows are a copy of the first's.
        with_cpu(x, |img: &[f32]| {
            forward::forward(cfg, params, off, plan, img, true, &masks, sw)
        })?;
        let v = with_cpu(y, |labels: &[u32]| {
            let (p, q) = plan.logits.split_at(m * classes);
            let (dp, dq) = plan.dlogits.split_at_mut(m * classes);
            rdrop_loss(dp, dq, p, q, labels, classes, loss, weight as f32)
                .map_err(|e| VitError::Config(format!("R-Drop loss: {e}")))
        })
        .and_then(|r| r)?;
        let (f, b) = cost::loss(m, classes);
        sw.lap("loss", f, b);
        let t1 = std::time::Instant::now();
        backward::backward(
            cfg,
            params,
            &mut self.grads,
            off,
            plan,
            &masks,
            cuts,
            ready,
            sw,
        );
        Ok(MicroLoss {
            loss: v.loss,
            ce: v.ce,
            kl: v.kl,
            forward_s: (t1 - t0).as_secs_f64(),
            backward_s: t1.elapsed().as_secs_f64(),
        })
    }
}
