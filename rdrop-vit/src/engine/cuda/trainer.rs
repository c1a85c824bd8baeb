//! [`CudaTrainer`]: `rdrop_core::FlatTrainer`'s update for the [`CudaEngine`], on the device:
//! ```text
//! G = 0;  for each micro-batch j:  G += ∇(w_j · s · L_j)   (s: the f16 loss scale, else 1)
//! [G ← Σ_ranks G]                                          (data parallel: NCCL, in place)
//!   buckets (grad_bucket_mb > 0): during the last backward, for each finished bucket b:
//!     event e_b on the compute stream; comm stream waits e_b; ncclAllReduce(b) on comm;
//!   then the compute stream waits for the comm stream (norm, step, next zeroing after it)
//! G ← G / s;  total = √(Σ G²)                              (f64 partials, fixed order)
//! f16: overflow (total not finite) → skip, scale ← scale/2 (rdrop_core::LossScaler)
//! coef = min(1, max_norm / (total + 1e-6));  θ = optimiser(θ, coef · G, lr_k)  (+ θ_T copy)
//! ```
//! The optimiser's moments stay on the device; checkpoints go through a host
//! [`rdrop_core::FlatOptimizer`] (its `parts`), so they are exactly its format and a run moves
//! between the CPU and CUDA engines.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use cudarc::driver::CudaStream;
use rdrop_core::dist::Collective;
use rdrop_core::trainer::check_finite;
use rdrop_core::{
    lr_lambda, CoreError, FlatLayout, FlatOptimizer, LossScaler, Precision, StepStats, TrainConfig,
    TrainState, UpdateSplit,
};

use super::engine::CudaEngine;
use crate::error::VitError;

fn core(e: VitError) -> CoreError {
    match e {
        VitError::Candle(c) => CoreError::Candle(c),
        VitError::Core(c) => c,
        other => CoreError::Config(other.to_string()),
    }
}

/// Accumulation, loss scaling, clipping, schedule and the optimiser for a [`CudaEngine`].
#[derive(Debug)]
pub struct CudaTrainer {
    cfg: TrainConfig,
    opt: FlatOptimizer,
    scaler: LossScaler,
    step: u64,
    /// The stream the gradient buckets are summed on (data parallel; made on first use).
    comm: Option<Arc<CudaStream>>,
    profiling: bool,
    profile: rdrop_core::Profile,
}

impl CudaTrainer {
    /// A trainer at update 0 for an engine with `layout`; f16 gets dynamic loss scaling.
    pub fn new(cfg: TrainConfig, layout: FlatLayout) -> rdrop_core::Result<Self> {
        cfg.validate()?;
        Ok(Self {
            opt: FlatOptimizer::new(cfg.optim, layout)?,
            scaler: LossScaler::new(cfg.scaler, cfg.precision == Precision::F16),
            cfg,
            step: 0,
            comm: None,
            profiling: false,
            profile: rdrop_core::Profile::default(),
        })
    }

    /// A trainer resumed from `state` (optimiser moments uploaded into `engine`, loss scaler,
    /// update count, the engine's dropout seed). `state` may come from any of the trainers.
    pub fn restore(
        cfg: TrainConfig,
        engine: &mut CudaEngine,
        state: &TrainState,
    ) -> rdrop_core::Result<Self> {
        let mut t = Self::new(cfg, engine.layout().clone())?;
        if state.scaler.enabled != t.scaler.enabled() {
            return Err(CoreError::Config(format!(
                "checkpoint loss scaler enabled = {}, but precision {:?} needs {}",
                state.scaler.enabled,
                cfg.precision,
                t.scaler.enabled()
            )));
        }
        t.opt.load_state(&state.optimizer)?;
        let (m, v, _) = t.opt.parts();
        engine.set_moments(m, v).map_err(core)?;
        // The host copy is only an exporter: drop its moments.
        let steps = t.opt.parts().2;
        t.opt.set_parts(Vec::new(), Vec::new(), steps)?;
        t.scaler.set_state(state.scaler);
        engine.set_rng_state(&state.rng).map_err(core)?;
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

    /// The learning rate of the next update.
    pub fn next_lr(&self) -> f64 {
        self.cfg.optim.lr * lr_lambda(self.step + 1, &self.cfg.schedule)
    }

    /// Records (`true`) where each update's time goes: the engine's op groups (CUDA events)
    /// plus `grad_reduce` and `optimizer` (zeroing, unscaling, norm, clipping and the step),
    /// timed on the host between stream syncs. Read with [`CudaTrainer::take_profile`].
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        self.profile = rdrop_core::Profile::default();
    }

    /// The profile of the updates since the last take (summed; empty when not profiling).
    pub fn take_profile(&mut self) -> rdrop_core::Profile {
        std::mem::take(&mut self.profile)
    }

    /// The current loss scale (1 unless f16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.scale()
    }

    /// The checkpointable state, in `rdrop_core::Trainer::state`'s format (the moments are
    /// downloaded).
    pub fn state(
        &self,
        engine: &CudaEngine,
        epoch: u64,
        batch_index: u64,
    ) -> rdrop_core::Result<TrainState> {
        let (m, v) = engine.moments().map_err(core)?;
        let mut opt = self.opt.clone();
        let steps = self.opt.parts().2;
        opt.set_parts(m, v, steps)?;
        Ok(TrainState {
            step: self.step,
            epoch,
            batch_index,
            rng: engine.rng_state(),
            scaler: self.scaler.state(),
            optimizer: opt.state()?,
            extra: serde_json::Value::Null,
        })
    }

    /// One full update over `micro_batches` (`x`, labels `y` as `u32`), which must number
    /// `accum_steps`.
    pub fn update(
        &mut self,
        engine: &mut CudaEngine,
        micro_batches: &[(Tensor, Tensor)],
    ) -> rdrop_core::Result<StepStats> {
        self.update_with(engine, micro_batches, None)
    }

    /// One data-parallel update, `rdrop_core::FlatTrainer::update_distributed`'s contract:
    /// `micro_batches` are this rank's contiguous slice `shard(B, world, rank)` of the global
    /// batch; masks are keyed by the global sample index (`rank · local + offset`), weights
    /// use the global sample count (mean) or `1/(accum · world)` (reference); the flat
    /// gradients are summed over the ranks in place on the engine's stream
    /// ([`Collective::all_reduce_sum_device`]: NCCL) and loss/CE/KL on the host, so every rank
    /// applies the same update. Runs the reductions even in a world of one.
    pub fn update_distributed(
        &mut self,
        engine: &mut CudaEngine,
        micro_batches: &[(Tensor, Tensor)],
        collective: &dyn Collective,
    ) -> rdrop_core::Result<StepStats> {
        self.update_with(engine, micro_batches, Some(collective))
    }

    /// The last micro-batch of a data-parallel update, its gradient buckets summed by NCCL on
    /// the comm stream while the backward goes on (see the module doc). Whatever happens, the
    /// compute stream then waits for every sum enqueued.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_reducing(
        &mut self,
        engine: &mut CudaEngine,
        c: &dyn Collective,
        cuts: &[usize],
        x: &Tensor,
        y: &Tensor,
        update: u64,
        first_sample: usize,
        weight: f64,
    ) -> rdrop_core::Result<rdrop_core::MicroLoss> {
        // The events, the waits, the NCCL calls and the join all run on this host thread: the
        // engine's stream is candle's per-thread stream, a different stream on another thread.
        let compute = engine.stream();
        let drv = |what: &str, e: cudarc::driver::DriverError| {
            CoreError::Config(format!("gradient buckets: {what}: {e}"))
        };
        let comm = match &self.comm {
            Some(s) if Arc::ptr_eq(s.context(), compute.context()) => s.clone(),
            _ => {
                let s =
                    new_side_stream(&compute).map_err(|e| drv("creating the NCCL stream", e))?;
                self.comm = Some(s.clone());
                s
            }
        };
        // Whatever happens below (an error, a panic), the compute stream waits for every sum
        // enqueued before anything reuses the gradients.
        let _join = JoinOnDrop {
            compute: &compute,
            comm: &comm,
        };
        let (base, len) = engine.grads_device_ptr();
        let comm_handle = comm.cu_stream() as usize as u64;
        let out = engine.accumulate_overlapped(
            x,
            y,
            update,
            first_sample,
            &self.cfg.loss,
            weight,
            cuts,
            &mut |r| {
                if r.end > len {
                    return Err(CoreError::Config(format!(
                        "gradient bucket {r:?} outside the {len} gradients"
                    )));
                }
                let done = compute
                    .record_event(None)
                    .map_err(|e| drv("recording an event", e))?;
                comm.wait(&done)
                    .map_err(|e| drv("waiting for the backward", e))?;
                let ptr = base + (r.start * std::mem::size_of::<f32>()) as u64;
                c.all_reduce_sum_device(ptr, r.len(), comm_handle)?;
                Ok(())
            },
        );
        let joined = compute
            .join(&comm)
            .map_err(|e| drv("waiting for the sums", e));
        let out = out.map_err(core)?;
        joined?;
        Ok(out)
    }
}

/// Makes `compute` wait for `comm` when dropped.
struct JoinOnDrop<'a> {
    compute: &'a CudaStream,
    comm: &'a CudaStream,
}

impl Drop for JoinOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.compute.join(self.comm);
    }
}

/// A second stream of `compute`'s context, for the gradient sums. cudarc's automatic
/// cross-stream tracking (an event recorded and waited for at every use of every buffer)
/// switches on for the whole context once it has two streams; candle's single per-thread
/// stream never needed it, and the sums are ordered by hand (an event per bucket, a join at
/// the end), so it is switched back off rather than taxing every kernel launch.
#[allow(unsafe_code)]
fn new_side_stream(
    compute: &Arc<CudaStream>,
) -> Result<Arc<CudaStream>, cudarc::driver::DriverError> {
    let s = compute.fork()?;
    // SAFETY: cudarc's requirement when tracking is off is that the program orders uses of a
    // buffer across streams itself. Only the gradient sums run on the side stream, each after
    // an event recorded on the compute stream when the backward has written its bucket, and
    // the compute stream joins the side stream before the gradients are read or written again
    // (`JoinOnDrop` even on errors); no buffer is allocated or freed on the side stream.
    unsafe { compute.context().disable_event_tracking() };
    Ok(s)
}

impl CudaTrainer {
    /// Errors: [`CoreError::NonFinite`] when the loss or the norm is not finite outside f16
    /// (the parameters are left unchanged); in f16 such an update is skipped and the scale
    /// backs off (every rank sees the same summed gradients, so all skip together).
    fn update_with(
        &mut self,
        engine: &mut CudaEngine,
        micro_batches: &[(Tensor, Tensor)],
        collective: Option<&dyn Collective>,
    ) -> rdrop_core::Result<StepStats> {
        let split = UpdateSplit::new(
            micro_batches,
            self.cfg.accum_steps,
            self.cfg.loss.mode,
            collective,
        )?;
        let k = self.step + 1;
        let scale = self.scaler.scale();
        let cuts = collective.and_then(|_| {
            let ready = engine.grad_ready_cuts();
            rdrop_core::dist::cuts_for(self.cfg.grad_bucket_mb, &ready, engine.layout().len())
        });
        let prof = self.profiling;
        engine.set_sync_timing(self.cfg.sync_timing || prof);
        engine.set_profiling(prof);
        let t0 = Instant::now();
        engine.zero_grads().map_err(core)?;
        if prof {
            engine.synchronize().map_err(core)?;
        }
        let zero_s = t0.elapsed().as_secs_f64();
        let (mut loss, mut ce, mut kl) = (0f64, 0f64, 0f64);
        let (mut fwd, mut bwd) = (0f64, 0f64);
        let last = micro_batches.len().saturating_sub(1);
        for (j, ((x, y), &(first, w))) in micro_batches.iter().zip(&split.micro).enumerate() {
            let l = match (collective, &cuts) {
                (Some(c), Some(cuts)) if j == last => {
                    self.accumulate_reducing(engine, c, cuts, x, y, k, first, w * scale)?
                }
                _ => engine
                    .accumulate(x, y, k, first, &self.cfg.loss, w * scale)
                    .map_err(core)?,
            };
            loss += w * l.loss;
            ce += w * l.ce;
            kl += w * l.kl;
            fwd += l.forward_s;
            bwd += l.backward_s;
        }
        let tr = Instant::now();
        if let Some(c) = collective {
            if cuts.is_none() {
                let (ptr, len) = engine.grads_device_ptr();
                let stream = engine.stream().cu_stream() as usize as u64;
                c.all_reduce_sum_device(ptr, len, stream)?;
            }
            [loss, ce, kl] = split.reduce_stats(c, [loss, ce, kl])?;
            if prof {
                engine.synchronize().map_err(core)?;
            }
        }
        let reduce_s = tr.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let lr = self.cfg.optim.lr * lr_lambda(k, &self.cfg.schedule);
        let max_norm = self.cfg.clip_norm.unwrap_or(f64::INFINITY);
        let grad_norm = engine
            .grad_norm((1.0 / scale) as f32, max_norm)
            .map_err(core)?;
        if !self.scaler.enabled() {
            check_finite(k, loss, grad_norm)?;
        }
        let skipped = self
            .scaler
            .update(!loss.is_finite() || !grad_norm.is_finite());
        if !skipped {
            let (_, _, steps) = self.opt.parts();
            let steps = steps + 1;
            engine
                .opt_step(&self.cfg.optim, self.opt.segments(), lr, steps)
                .map_err(core)?;
            self.opt.set_parts(Vec::new(), Vec::new(), steps)?;
        }
        if self.cfg.sync_timing || prof {
            engine.synchronize().map_err(core)?;
        }
        self.step = k;
        if prof {
            let p = engine.take_profile();
            self.profile.merge(&p);
            let n = engine.layout().len() as f64;
            // As rdrop_core::FlatTrainer counts them: the reduction moves the f32 gradient in
            // and out; the optimiser reads g for the norm, then p, g, the moment, and writes p,
            // the moment and the compute copy.
            if collective.is_some() {
                self.profile.add("grad_reduce", reduce_s * 1e3, n, 8.0 * n);
            }
            self.profile.add(
                "optimizer",
                (zero_s + t1.elapsed().as_secs_f64()) * 1e3,
                6.0 * n,
                28.0 * n,
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
