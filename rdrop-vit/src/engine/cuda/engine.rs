//! [`CudaEngine`]: the explicit engine's state on one GPU. f32 master parameters, their copy in
//! the compute type `T` (f32, bf16 or f16; written by the update kernels, so no cast runs per
//! forward), f32 gradients, the optimiser's moments, the activation plan, the kernels and
//! cuBLASLt, all on candle's stream for the model's device.

use std::sync::Arc;

use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};
use rdrop_core::{
    FlatLayout, MicroLoss, MicroStep, OptimConfig, OptimizerKind, Precision, RngState,
};
use rdrop_kernels::cuda::{Compute, CudaKernelError, CudaKernels, LOSS_HEADER, SUM_SQUARES_BLOCKS};
use rdrop_kernels::dropout::RowKey;
use rdrop_kernels::optim::{AdamWHyper, SgdHyper};

use super::backward::{backward, BucketReady};
use super::forward::{forward, Ctx};
use super::gemm::Gemm;
use super::laps::EventLaps;
use super::plan::DevicePlan;
use super::plan::PlanSpec;
use crate::config::ViTConfig;
use crate::engine::forward::Masks;
use crate::engine::params::{self, Offsets};
use crate::error::{Result, VitError};
use crate::model::VisionTransformer;

impl From<CudaKernelError> for VitError {
    fn from(e: CudaKernelError) -> Self {
        VitError::cuda("kernel launch", e)
    }
}

fn drv(op: &str) -> impl FnOnce(cudarc::driver::DriverError) -> VitError + '_ {
    move |e| VitError::cuda(op, e)
}

/// The device state for one compute type.
#[derive(Debug)]
pub(crate) struct Dev<T> {
    pub stream: Arc<CudaStream>,
    pub k: CudaKernels,
    pub gemm: Gemm,
    pub params: CudaSlice<f32>,
    pub params_t: CudaSlice<T>,
    pub grads: CudaSlice<f32>,
    /// Momentum / AdamW's first moment, AdamW's second moment (allocated when first needed).
    pub m: Option<CudaSlice<f32>>,
    pub v: Option<CudaSlice<f32>>,
    /// Stands for an absent momentum buffer (SGD with μ = 0 never reads it).
    pub dummy: CudaSlice<f32>,
    pub sumsq: CudaSlice<f64>,
    pub sq_scratch: CudaSlice<f64>,
    pub coef: CudaSlice<f32>,
    pub norm: CudaSlice<f64>,
    pub plan: Option<DevicePlan<T>>,
}

impl<T: Compute + cudarc::driver::ValidAsZeroBits> Dev<T> {
    fn new(stream: Arc<CudaStream>, host: &[f32]) -> Result<Self> {
        let k = CudaKernels::new(stream.clone())?;
        let gemm = Gemm::new(stream.clone())?;
        let params = stream
            .clone_htod(host)
            .map_err(drv("uploading parameters"))?;
        let mut params_t = stream
            .alloc_zeros::<T>(host.len().max(1))
            .map_err(drv("allocating the compute copy of the parameters"))?;
        k.cast_from_f32::<T>(&mut params_t.slice_mut(..host.len()), &params)?;
        let z32 = |n| stream.alloc_zeros::<f32>(n).map_err(drv("allocating"));
        let z64 = |n| stream.alloc_zeros::<f64>(n).map_err(drv("allocating"));
        Ok(Self {
            grads: z32(host.len().max(1))?,
            dummy: z32(1)?,
            coef: z32(1)?,
            sumsq: z64(1)?,
            norm: z64(1)?,
            sq_scratch: z64(SUM_SQUARES_BLOCKS)?,
            m: None,
            v: None,
            plan: None,
            k,
            gemm,
            params,
            params_t,
            stream,
        })
    }

    /// The plan for `rows` rows, re-planned only when the shape changes (the old plan is
    /// freed first).
    fn ensure_plan(&mut self, cfg: &ViTConfig, rows: usize, train: bool) -> Result<()> {
        let spec = PlanSpec::new(cfg, rows, std::mem::size_of::<T>(), train);
        if self.plan.as_ref().is_some_and(|p| p.spec == spec) {
            return Ok(());
        }
        self.plan = None;
        self.plan = Some(DevicePlan::new(&self.stream, spec)?);
        Ok(())
    }

    fn plan_mut(&mut self) -> Result<&mut DevicePlan<T>> {
        self.plan
            .as_mut()
            .ok_or_else(|| VitError::cuda("CUDA engine", "no activation plan"))
    }

    /// Copies `count` f32 values of `x` (CPU or this GPU) into the plan's image buffer.
    fn upload_images(&mut self, x: &Tensor, count: usize) -> Result<()> {
        let stream = self.stream.clone();
        let plan = self.plan_mut()?;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let mut dst = plan.images.slice_mut(..count);
        if let Device::Cuda(cd) = x.device() {
            if Arc::ptr_eq(&cd.cuda_stream(), &stream) {
                let (st, layout) = x.storage_and_layout();
                if let Storage::Cuda(cs) = &*st {
                    let src = cs.as_cuda_slice::<f32>()?;
                    let start = layout.start_offset();
                    return stream
                        .memcpy_dtod(&src.slice(start..start + count), &mut dst)
                        .map_err(drv("copying the images"));
                }
            }
        }
        let host = x.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        stream
            .memcpy_htod(&host, &mut dst)
            .map_err(drv("uploading the images"))
    }

    fn upload_keys(&mut self, rows: &[RowKey]) -> Result<()> {
        let stream = self.stream.clone();
        let plan = self.plan_mut()?;
        let host: Vec<u32> = rows.iter().flat_map(|r| [r.sample, r.pass]).collect();
        stream
            .memcpy_htod(&host, &mut plan.row_keys.slice_mut(..host.len()))
            .map_err(drv("uploading the row keys"))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_forward(
        &mut self,
        cfg: &ViTConfig,
        off: &Offsets,
        masks: &Masks,
        images: usize,
        duplicate: bool,
        laps: &mut EventLaps,
    ) -> Result<()> {
        let rows = if duplicate { 2 * images } else { images };
        let Dev {
            k,
            gemm,
            params,
            params_t,
            plan,
            ..
        } = self;
        let plan = plan
            .as_mut()
            .ok_or_else(|| VitError::cuda("CUDA forward", "no activation plan"))?;
        let mut c = Ctx {
            k,
            gemm,
            p: params,
            pt: params_t,
            cfg,
            masks,
            rows,
            laps,
        };
        forward(&mut c, off, plan, images, duplicate)
    }

    fn run_backward(
        &mut self,
        cfg: &ViTConfig,
        off: &Offsets,
        masks: &Masks,
        cuts: &[usize],
        ready: &mut BucketReady<'_>,
        laps: &mut EventLaps,
    ) -> Result<()> {
        let Dev {
            k,
            gemm,
            params,
            params_t,
            plan,
            grads,
            ..
        } = self;
        let plan = plan
            .as_mut()
            .ok_or_else(|| VitError::cuda("CUDA backward", "no activation plan"))?;
        let mut c = Ctx {
            k,
            gemm,
            p: params,
            pt: params_t,
            cfg,
            masks,
            rows: plan.spec.rows,
            laps,
        };
        backward(&mut c, off, plan, grads, cuts, ready)
    }

    fn logits_host(&self, rows: usize, classes: usize) -> Result<Vec<f32>> {
        let plan = self
            .plan
            .as_ref()
            .ok_or_else(|| VitError::cuda("CUDA engine", "no activation plan"))?;
        self.stream
            .clone_dtoh(&plan.logits.slice(..rows * classes))
            .map_err(drv("downloading the logits"))
    }

    /// `‖g‖` after `g ← g·inv_scale` (when ≠ 1), and the clipping coefficient left on the
    /// device for the update kernels. One host sync (the norm).
    fn grad_norm(&mut self, inv_scale: f32, max_norm: f64) -> Result<f64> {
        if inv_scale != 1.0 {
            self.k.scale_grads(&mut self.grads, inv_scale)?;
        }
        self.k
            .sum_squares(&mut self.sumsq, &mut self.sq_scratch, &self.grads, false)?;
        self.k
            .clip_coef(&mut self.coef, &mut self.norm, &self.sumsq, max_norm)?;
        let n = self
            .stream
            .clone_dtoh(&self.norm)
            .map_err(drv("reading the gradient norm"))?;
        Ok(n.first().copied().unwrap_or(f64::NAN))
    }

    /// One optimiser update (`steps` = updates applied including this one) over the
    /// weight-decay segments, writing the `T` copy of the parameters too.
    fn opt_step(
        &mut self,
        cfg: &OptimConfig,
        segments: &[(std::ops::Range<usize>, bool)],
        lr: f64,
        steps: u64,
    ) -> Result<()> {
        let n = self.params.len();
        let zeros = |s: &Arc<CudaStream>| s.alloc_zeros::<f32>(n).map_err(drv("allocating"));
        let needs_m = cfg.kind == OptimizerKind::AdamW || cfg.momentum != 0.0;
        if needs_m && self.m.is_none() {
            self.m = Some(zeros(&self.stream)?);
        }
        if cfg.kind == OptimizerKind::AdamW && self.v.is_none() {
            self.v = Some(zeros(&self.stream)?);
        }
        let Dev {
            k,
            params,
            params_t,
            grads,
            m,
            v,
            dummy,
            coef,
            ..
        } = self;
        for (r, decay) in segments {
            let wd = if *decay { cfg.weight_decay as f32 } else { 0.0 };
            let mut pt = params_t.slice_mut(r.clone());
            let g = grads.slice(r.clone());
            match cfg.kind {
                OptimizerKind::Sgd => {
                    let h = SgdHyper {
                        lr: lr as f32,
                        momentum: cfg.momentum as f32,
                        nesterov: cfg.nesterov,
                        weight_decay: wd,
                    };
                    let mut mom = match m.as_mut() {
                        Some(m) => m.slice_mut(r.clone()),
                        None => dummy.slice_mut(..0),
                    };
                    k.sgd_update::<T>(
                        &mut params.slice_mut(r.clone()),
                        Some(&mut pt),
                        &g,
                        &mut mom,
                        &*coef,
                        steps == 1,
                        &h,
                    )?;
                }
                OptimizerKind::AdamW => {
                    let h = AdamWHyper {
                        lr: lr as f32,
                        beta1: cfg.beta1 as f32,
                        beta2: cfg.beta2 as f32,
                        eps: cfg.eps as f32,
                        weight_decay: wd,
                    };
                    let (Some(m), Some(v)) = (m.as_mut(), v.as_mut()) else {
                        return Err(VitError::cuda("AdamW update", "moments not allocated"));
                    };
                    k.adamw_update::<T>(
                        &mut params.slice_mut(r.clone()),
                        Some(&mut pt),
                        &g,
                        [&mut m.slice_mut(r.clone()), &mut v.slice_mut(r.clone())],
                        &*coef,
                        steps,
                        &h,
                    )?;
                }
            }
        }
        Ok(())
    }

    fn moments_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let get = |b: &Option<CudaSlice<f32>>| -> Result<Vec<f32>> {
            match b {
                Some(b) => self
                    .stream
                    .clone_dtoh(b)
                    .map_err(drv("downloading the optimiser state")),
                None => Ok(Vec::new()),
            }
        };
        Ok((get(&self.m)?, get(&self.v)?))
    }

    fn set_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        let up = |s: &Arc<CudaStream>, h: &[f32]| -> Result<Option<CudaSlice<f32>>> {
            if h.is_empty() {
                Ok(None)
            } else {
                s.clone_htod(h)
                    .map(Some)
                    .map_err(drv("uploading the optimiser state"))
            }
        };
        self.m = up(&self.stream, m)?;
        self.v = up(&self.stream, v)?;
        Ok(())
    }
}

/// The device state in the run's compute type.
#[derive(Debug)]
enum AnyDev {
    F32(Dev<f32>),
    Bf16(Dev<bf16>),
    F16(Dev<f16>),
}

/// Runs `$body` with `$d` bound to the engine's `Dev<T>` whatever `T` is.
macro_rules! with_dev {
    ($any:expr, $d:ident => $body:expr) => {
        match $any {
            AnyDev::F32($d) => $body,
            AnyDev::Bf16($d) => $body,
            AnyDev::F16($d) => $body,
        }
    };
}

/// The explicit engine on one GPU (see the module doc of `engine::cuda`).
#[derive(Debug)]
pub struct CudaEngine {
    cfg: ViTConfig,
    layout: FlatLayout,
    off: Offsets,
    precision: Precision,
    device: Device,
    rng: RngState,
    rows: Vec<RowKey>,
    /// Drain the stream after each micro-batch's forward (an honest forward/backward split).
    sync_timing: bool,
    /// The step profile's events (off unless profiling).
    laps: EventLaps,
    dev: AnyDev,
    /// The stream the gradient buckets are summed on (data parallel; made on first use).
    pub(super) comm: Option<Arc<CudaStream>>,
}

impl CudaEngine {
    /// An engine holding a copy of `model`'s parameters on the model's GPU, computing in
    /// `precision` (f32 master weights and gradients in every case).
    pub fn from_model(model: &VisionTransformer, precision: Precision) -> Result<Self> {
        let Device::Cuda(cd) = model.device() else {
            return Err(VitError::Config(format!(
                "the CUDA engine needs the model on a CUDA device, it is on {:?}",
                model.device()
            )));
        };
        let stream = cd.cuda_stream();
        let laps = EventLaps::new(stream.clone());
        let cfg = model.config().clone();
        let (layout, off) = params::layout(&cfg);
        let mut host = vec![0f32; layout.len()];
        params::read_from_model(&layout, model, &mut host)?;
        let dev = match precision {
            Precision::F32 => AnyDev::F32(Dev::new(stream, &host)?),
            Precision::Bf16 => AnyDev::Bf16(Dev::new(stream, &host)?),
            Precision::F16 => AnyDev::F16(Dev::new(stream, &host)?),
        };
        Ok(Self {
            cfg,
            layout,
            off,
            precision,
            device: model.device().clone(),
            rng: model.rng().state(),
            rows: Vec::new(),
            sync_timing: false,
            laps,
            dev,
            comm: None,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ViTConfig {
        &self.cfg
    }

    /// The flat layout of parameters and gradients.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// Whether [`CudaEngine::accumulate`] drains the stream after the forward and loss, so
    /// that its forward and backward times are the GPU's (`rdrop bench`); otherwise the forward
    /// time is host enqueue time and the backward's includes the rest.
    pub fn set_sync_timing(&mut self, on: bool) {
        self.sync_timing = on;
    }

    /// The compute precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The image of rdrop's kernels the driver runs on this GPU (a cubin, or PTX it compiled).
    pub fn kernel_image(&self) -> rdrop_kernels::arch::KernelImage {
        with_dev!(&self.dev, d => d.k.image())
    }

    /// The engine's stream (candle's for the device): every kernel and GEMM runs on it.
    pub fn stream(&self) -> Arc<CudaStream> {
        with_dev!(&self.dev, d => d.stream.clone())
    }

    /// The flat f32 gradient buffer's device address and length, for an all-reduce between
    /// the backward and the update (NCCL, on [`CudaEngine::stream`] or on another stream
    /// ordered after the backward's writes and joined before the update).
    pub fn grads_device_ptr(&self) -> (u64, usize) {
        with_dev!(&self.dev, d => {
            let (p, _record) = d.grads.device_ptr(&d.stream);
            (p, self.layout.len())
        })
    }

    /// The f32 master parameters (a download).
    pub fn params(&self) -> Result<Vec<f32>> {
        with_dev!(&self.dev, d => d.stream.clone_dtoh(&d.params.slice(..self.layout.len())).map_err(drv("downloading the parameters")))
    }

    /// The accumulated gradients (a download; same layout as the parameters).
    pub fn grads(&self) -> Result<Vec<f32>> {
        with_dev!(&self.dev, d => d.stream.clone_dtoh(&d.grads.slice(..self.layout.len())).map_err(drv("downloading the gradients")))
    }

    /// Writes the engine's parameters into `model` (to save it with the model's writers).
    pub fn write_to(&self, model: &VisionTransformer) -> Result<()> {
        params::write_to_model(&self.layout, &self.params()?, model)
    }

    /// Sets the dropout generator's state (resume).
    pub fn set_rng_state(&mut self, s: &RngState) -> Result<()> {
        s.check_generator()?;
        self.rng = s.clone();
        Ok(())
    }

    /// The dropout generator's state.
    pub fn rng_state(&self) -> RngState {
        self.rng.clone()
    }

    /// Bytes of activations and scratch currently planned ([`super::plan_bytes`] of the plan).
    pub fn plan_bytes(&self) -> usize {
        with_dev!(&self.dev, d => d.plan.as_ref().map_or(0, |p| p.spec.bytes()))
    }

    /// Bytes the current plan's buffers hold on the device (its spec's bytes plus one element
    /// per empty buffer).
    pub fn plan_allocated_bytes(&self) -> usize {
        with_dev!(&self.dev, d => d.plan.as_ref().map_or(0, |p| p.allocated_bytes()))
    }

    fn check_images(&self, x: &Tensor) -> Result<usize> {
        crate::engine::check_images(&self.cfg, x)
    }

    fn pixels(&self) -> usize {
        self.cfg.num_channels * self.cfg.image_size * self.cfg.image_size
    }

    /// Logits `(B, classes)` (f32, on the engine's device) of images `x (B, C, S, S)` in eval
    /// mode (no dropout), with an inference plan.
    pub fn forward_eval(&mut self, x: &Tensor) -> Result<Tensor> {
        self.forward_logits(x, 0, &[], false)
    }

    /// Training-mode logits `(B, classes)` with the masks of `update` and `rows` (one key per
    /// image).
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
        let (cfg, off, px) = (&self.cfg, &self.off, self.pixels());
        let masks = Masks {
            seed: self.rng.seed,
            update,
            rows: &[],
            train,
        };
        let classes = cfg.num_classes;
        // cuBLASLt may find no algorithm for a one-row GEMM (the classifier of one image):
        // one image runs as two identical rows (no dropout in eval), its first row returned.
        let twice = !train && b == 1;
        let logits = with_dev!(&mut self.dev, d => {
            d.ensure_plan(cfg, if twice { 2 } else { b }, train)?;
            d.upload_images(x, b * px)?;
            if train {
                d.upload_keys(rows)?;
            }
            d.run_forward(cfg, off, &masks, b, twice, &mut self.laps)?;
            d.logits_host(b, classes)?
        });
        Ok(Tensor::from_vec(logits, (b, classes), &self.device)?)
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self) -> Result<()> {
        with_dev!(&mut self.dev, d => d.stream.memset_zeros(&mut d.grads).map_err(drv("zeroing the gradients")))
    }

    /// Two training passes of micro-batch `mb.x` `(m, …)` with labels `mb.y` (`u32`, `(m,)`)
    /// as one forward of `2m` rows (`[x; x]`), the R-Drop loss on the device, and its backward:
    /// adds `mb.weight · ∇loss` to the gradients (see `rdrop_core::FlatRDropModel::accumulate`).
    /// One host sync (the loss values).
    pub fn accumulate(&mut self, mb: &MicroStep<'_>) -> Result<MicroLoss> {
        self.accumulate_overlapped(mb, &[], &mut |_| Ok(()))
    }

    /// The offsets of the gradient buffer at which the backward has finished everything above
    /// (`rdrop_core::FlatRDropModel::grad_ready_cuts`; the CPU engine's, the same layout).
    pub fn grad_ready_cuts(&self) -> Vec<usize> {
        crate::engine::backward::ready_cuts(&self.off)
    }

    /// [`CudaEngine::accumulate`], calling `ready` with each bucket `[cuts_i, cuts_{i−1})` of
    /// the gradient buffer as soon as the kernels writing its last values are enqueued on
    /// [`CudaEngine::stream`] (`cuts`: from `rdrop_core::dist::bucket_cuts` over
    /// [`CudaEngine::grad_ready_cuts`]); `ready` orders its own work after them (an event).
    pub fn accumulate_overlapped(
        &mut self,
        mb: &MicroStep<'_>,
        cuts: &[usize],
        ready: &mut BucketReady<'_>,
    ) -> Result<MicroLoss> {
        let (x, y, loss, weight) = (mb.x, mb.y, mb.loss, mb.weight);
        let m = self.check_images(x)?;
        let update = mb.mask_rows(m, &mut self.rows)?;
        let labels = y
            .to_dtype(DType::U32)?
            .to_device(&Device::Cpu)?
            .to_vec1::<u32>()?;
        let (cfg, off, px, rows) = (&self.cfg, &self.off, self.pixels(), &self.rows);
        let masks = Masks {
            seed: self.rng.seed,
            update,
            rows: &[],
            train: true,
        };
        let classes = cfg.num_classes;
        // Bad labels fail here, before anything is launched (the CPU engine's check): the
        // gradients stay untouched.
        if let Some((sample, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes)
        {
            return Err(VitError::Config(
                rdrop_kernels::loss::LossError::LabelOutOfRange {
                    sample,
                    label,
                    classes,
                }
                .to_string(),
            ));
        }
        let sync = self.sync_timing;
        let t0 = std::time::Instant::now();
        // Forward, loss and backward are enqueued back to back; the loss header is read after
        // the backward (which never writes it): one sync per micro-batch, no bubble. With
        // `sync_timing` the stream is also drained after the loss, for an honest split.
        let (vals, t1, t2) = with_dev!(&mut self.dev, d => {
            d.ensure_plan(cfg, 2 * m, true)?;
            d.upload_images(x, m * px)?;
            d.upload_keys(rows)?;
            let stream = d.stream.clone();
            {
                let plan = d.plan_mut()?;
                stream
                    .memcpy_htod(&labels, &mut plan.labels.slice_mut(..m))
                    .map_err(drv("uploading the labels"))?;
            }
            self.laps.start()?;
            d.run_forward(cfg, off, &masks, m, true, &mut self.laps)?;
            {
                let Dev { k, plan, .. } = &mut *d;
                let plan = plan
                    .as_mut()
                    .ok_or_else(|| VitError::cuda("R-Drop loss", "no activation plan"))?;
                k.rdrop_loss(
                    &mut plan.dlogits,
                    &mut plan.loss,
                    &plan.logits,
                    &plan.labels.slice(..m),
                    [m, classes],
                    loss,
                    weight as f32,
                )?;
            }
            self.laps.lap("loss", crate::engine::cost::loss(m, classes))?;
            if sync {
                stream.synchronize().map_err(drv("synchronising"))?;
            }
            let t1 = std::time::Instant::now();
            d.run_backward(cfg, off, &masks, cuts, ready, &mut self.laps)?;
            let vals = {
                let plan = d.plan_mut()?;
                stream
                    .clone_dtoh(&plan.loss.slice(..LOSS_HEADER))
                    .map_err(drv("reading the loss"))?
            };
            (vals, t1, std::time::Instant::now())
        });
        // The loss read above waited for the backward: every event has fired.
        self.laps.finish()?;
        if vals.get(3).copied().unwrap_or(0.0) != 0.0 {
            return Err(VitError::Config(format!(
                "{} labels of the micro-batch are ≥ the model's {classes} classes",
                vals[3]
            )));
        }
        Ok(MicroLoss {
            loss: vals[0],
            ce: vals[1],
            kl: vals[2],
            forward_s: (t1 - t0).as_secs_f64(),
            backward_s: (t2 - t1).as_secs_f64(),
        })
    }

    /// `‖g‖` of the gradients after un-scaling them by `inv_scale`, leaving the clipping
    /// coefficient for `max_norm` on the device (one host sync).
    pub(crate) fn grad_norm(&mut self, inv_scale: f32, max_norm: f64) -> Result<f64> {
        with_dev!(&mut self.dev, d => d.grad_norm(inv_scale, max_norm))
    }

    /// The optimiser update `steps` (counting from 1) at learning rate `lr` with the clipping
    /// coefficient [`CudaEngine::grad_norm`] left on the device.
    pub(crate) fn opt_step(
        &mut self,
        cfg: &OptimConfig,
        segments: &[(std::ops::Range<usize>, bool)],
        lr: f64,
        steps: u64,
    ) -> Result<()> {
        with_dev!(&mut self.dev, d => d.opt_step(cfg, segments, lr, steps))
    }

    /// The optimiser's moments (downloads; empty when not allocated).
    pub(crate) fn moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        with_dev!(&self.dev, d => d.moments_host())
    }

    /// Uploads the optimiser's moments (empty: not allocated).
    pub(crate) fn set_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        let n = self.layout.len();
        if (!m.is_empty() && m.len() != n) || (!v.is_empty() && v.len() != n) {
            return Err(VitError::Config(format!(
                "optimiser moments of {} and {} values for {n} parameters",
                m.len(),
                v.len()
            )));
        }
        with_dev!(&mut self.dev, d => d.set_moments(m, v))
    }

    /// Starts (`true`) or stops recording where each micro-batch's time goes: CUDA events
    /// between the op groups (see `rdrop_core::Profile`).
    pub fn set_profiling(&mut self, on: bool) {
        if on != self.laps.is_on() {
            self.laps.set_on(on);
        }
    }

    /// The op groups of the micro-batches since the last take (empty when not profiling).
    pub fn take_profile(&mut self) -> rdrop_core::Profile {
        self.laps.take()
    }

    /// Waits for everything queued on the engine's stream.
    pub fn synchronize(&self) -> Result<()> {
        with_dev!(&self.dev, d => d.stream.synchronize().map_err(drv("synchronising")))
    }
}
