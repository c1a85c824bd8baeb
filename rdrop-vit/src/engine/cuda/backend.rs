//! The [`CudaEngine`] as an [`UpdateBackend`]: `rdrop_core::FlatTrainer`'s update on the
//! device. The trainer's sequence (`rdrop_core::flat`) maps to:
//! ```text
//! G = 0; G += ∇(w_j · s · L_j)            zero_grads, accumulate: kernels on the engine's stream
//! [G ← Σ_ranks G]                          NCCL, in place; with buckets (grad_bucket_mb > 0),
//!   during the last backward, for each finished bucket b: event e_b on the compute stream;
//!   the comm stream waits e_b; ncclAllReduce(b) on comm; then the compute stream waits for
//!   the comm stream (norm, step, next zeroing after it)
//! G ← G / s; ‖G‖; coef                     one kernel chain, the coefficient left on the device
//! θ = optimiser(θ, coef · G, lr_k)         on the device (+ the compute copy θ_T)
//! ```
//! The optimiser's moments stay on the device; checkpoints go through the trainer's host
//! [`FlatOptimizer`] (its `parts`), so they are exactly its format and a run moves between the
//! CPU and CUDA engines.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use rdrop_core::dist::Collective;
use rdrop_core::{
    CoreError, FlatLayout, FlatOptimizer, MicroLoss, MicroStep, OptimizerState, Precision, Profile,
    Result, RngState, UpdateBackend,
};

use super::engine::CudaEngine;

impl UpdateBackend for CudaEngine {
    fn layout(&self) -> &FlatLayout {
        CudaEngine::layout(self)
    }

    /// f32, bf16 and f16 (with the trainer's loss scaler).
    fn check_precision(&self, _precision: Precision) -> Result<()> {
        Ok(())
    }

    fn grad_ready_cuts(&self) -> Vec<usize> {
        CudaEngine::grad_ready_cuts(self)
    }

    /// The op groups are timed with CUDA events; `sync` also drains the stream after each
    /// micro-batch's forward (an honest forward/backward split).
    fn set_profiling(&mut self, on: bool, sync: bool) {
        self.set_sync_timing(sync);
        CudaEngine::set_profiling(self, on);
    }

    fn take_profile(&mut self) -> Profile {
        CudaEngine::take_profile(self)
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(CudaEngine::synchronize(self)?)
    }

    fn zero_grads(&mut self) -> Result<()> {
        Ok(CudaEngine::zero_grads(self)?)
    }

    fn accumulate(&mut self, mb: &MicroStep<'_>) -> Result<MicroLoss> {
        Ok(CudaEngine::accumulate(self, mb)?)
    }

    /// The buckets are summed by NCCL on a side stream while the backward goes on (see the
    /// module doc); whatever happens, the compute stream then waits for every sum enqueued.
    /// The host does not wait (the join is a stream wait): no time is returned.
    fn accumulate_reducing(
        &mut self,
        mb: &MicroStep<'_>,
        c: &dyn Collective,
        cuts: &[usize],
    ) -> Result<(MicroLoss, f64)> {
        // The events, the waits, the NCCL calls and the join all run on this host thread: the
        // engine's stream is candle's per-thread stream, a different stream on another thread.
        let compute = self.stream();
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
        let (base, len) = self.grads_device_ptr();
        let comm_handle = comm.cu_stream() as usize as u64;
        let out = self.accumulate_overlapped(mb, cuts, &mut |r| {
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
        });
        let joined = compute
            .join(&comm)
            .map_err(|e| drv("waiting for the sums", e));
        let out = out?;
        joined?;
        Ok((out, 0.0))
    }

    /// In place on the engine's stream ([`Collective::all_reduce_sum_device`]: NCCL).
    fn reduce_grads(&mut self, c: &dyn Collective) -> Result<()> {
        let (ptr, len) = self.grads_device_ptr();
        let stream = self.stream().cu_stream() as usize as u64;
        Ok(c.all_reduce_sum_device(ptr, len, stream)?)
    }

    /// Un-scales, reduces and leaves the clipping coefficient on the device (one host sync).
    fn grad_norm(&mut self, inv_scale: f32, max_norm: Option<f64>) -> Result<f64> {
        Ok(CudaEngine::grad_norm(
            self,
            inv_scale,
            max_norm.unwrap_or(f64::INFINITY),
        )?)
    }

    /// Uses the device's copy of `coef` (left by [`UpdateBackend::grad_norm`]); the host
    /// optimiser only counts the step.
    fn step(&mut self, opt: &mut FlatOptimizer, lr: f64, _coef: f32) -> Result<()> {
        let steps = opt.parts().2 + 1;
        self.opt_step(opt.config(), opt.segments(), lr, steps)?;
        opt.set_parts(Vec::new(), Vec::new(), steps)
    }

    fn rng_state(&self) -> RngState {
        CudaEngine::rng_state(self)
    }

    fn set_rng_state(&mut self, s: &RngState) -> Result<()> {
        Ok(CudaEngine::set_rng_state(self, s)?)
    }

    /// Downloads the moments into a copy of `opt`.
    fn optimizer_state(&self, opt: &FlatOptimizer) -> Result<OptimizerState> {
        let (m, v) = self.moments()?;
        let mut opt = opt.clone();
        let steps = opt.parts().2;
        opt.set_parts(m, v, steps)?;
        opt.state()
    }

    /// Uploads the moments; the host copy keeps only the step count.
    fn load_optimizer_state(&mut self, opt: &mut FlatOptimizer, s: &OptimizerState) -> Result<()> {
        opt.load_state(s)?;
        let (m, v, steps) = opt.parts();
        self.set_moments(m, v)?;
        opt.set_parts(Vec::new(), Vec::new(), steps)
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
) -> std::result::Result<Arc<CudaStream>, cudarc::driver::DriverError> {
    let s = compute.fork()?;
    // SAFETY: cudarc's requirement when tracking is off is that the program orders uses of a
    // buffer across streams itself. Only the gradient sums run on the side stream, each after
    // an event recorded on the compute stream when the backward has written its bucket, and
    // the compute stream joins the side stream before the gradients are read or written again
    // (`JoinOnDrop` even on errors); no buffer is allocated or freed on the side stream.
    unsafe { compute.context().disable_event_tracking() };
    Ok(s)
}
