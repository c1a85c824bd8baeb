//! Launchers of `optim.cu`: the update over the flat f32 buffers.

use super::launch::{when, Len, THREADS};
use super::SUM_SQUARES_BLOCKS;
use super::{shape, Compute, CudaKernels, CudaViewMutT, DevicePtr, DevicePtrMut, Result};
use crate::optim::{AdamCoef, AdamWHyper, SgdHyper};

impl CudaKernels {
    /// `out[0] (+)= Σ x²` in f64 (`+=` when `accumulate`, so several buffers add up), in a
    /// fixed order: [`SUM_SQUARES_BLOCKS`] blocks of 256 threads stride over `x` (f32 → f64
    /// per element, f64 per thread, a fixed tree per block) into `scratch`, then one warp sums
    /// the block partials in a fixed order. Shapes: `out` `(1)` f64, `scratch`
    /// `(SUM_SQUARES_BLOCKS)` f64, `x` `(len)` f32.
    pub fn sum_squares(
        &self,
        out: &mut impl DevicePtrMut<f64>,
        scratch: &mut impl DevicePtrMut<f64>,
        x: &impl DevicePtr<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let n = x.len();
        self.plain("sum_squares_partials")
            .output("scratch", scratch, Len::AtLeast(SUM_SQUARES_BLOCKS))
            .input("x", x, n)
            .ints([("elements", n)])
            .launch_grid(SUM_SQUARES_BLOCKS, THREADS, false)?;
        self.plain("sum_squares_finish")
            .output("out", out, 1)
            .output("scratch", scratch, Len::AtLeast(SUM_SQUARES_BLOCKS))
            .ints([("blocks", SUM_SQUARES_BLOCKS)])
            .flag(accumulate)
            .launch_grid(1, 32, false)
    }

    /// The clipping coefficient on the device (crate::optim::clip_coef of `√sumsq[0]`):
    /// `coef[0] = min(1, max_norm / (‖g‖ + 1e-6))` in f32, `1` when `max_norm` is infinite;
    /// also `norm[0] = ‖g‖` (f64) for the log. Grid: one thread.
    pub fn clip_coef(
        &self,
        coef: &mut impl DevicePtrMut<f32>,
        norm: &mut impl DevicePtrMut<f64>,
        sumsq: &impl DevicePtr<f64>,
        max_norm: f64,
    ) -> Result<()> {
        const K: &str = "clip_coef";
        if max_norm.is_nan() || max_norm < 0.0 {
            return Err(shape(K, format!("max_norm {max_norm} is not a norm")));
        }
        self.plain(K)
            .output("coef", coef, 1)
            .output("norm", norm, 1)
            .input("sumsq", sumsq, 1)
            .floats([if max_norm.is_infinite() {
                -1.0
            } else {
                max_norm as f32
            }])
            .launch_grid(1, 1, false)
    }

    /// One SGD(-momentum, Nesterov, L2 wd) update (crate::optim::sgd_step, bit for bit):
    /// gradient scale `coef[0]` read on the device (so no host sync), then `params_t =
    /// cast_T(params)` when given (the compute copy for the next forward). One launch per
    /// weight-decay segment: pass sub-views. Shapes: `params`, `grads`, `mom` (empty allowed
    /// when μ = 0), `params_t` `(len)`; `coef` `(1)` f32. Grid: one thread per element.
    #[allow(clippy::too_many_arguments)]
    pub fn sgd_update<T: Compute>(
        &self,
        params: &mut impl DevicePtrMut<f32>,
        params_t: Option<&mut CudaViewMutT<'_, T>>,
        grads: &impl DevicePtr<f32>,
        mom: &mut impl DevicePtrMut<f32>,
        coef: &impl DevicePtr<f32>,
        first_step: bool,
        h: &SgdHyper,
    ) -> Result<()> {
        let n = params.len();
        self.typed::<T>("sgd_update")
            .output("params", params, n)
            .output_opt("params_t", params_t, n)
            .input("grads", grads, n)
            .output("mom", mom, when(h.momentum != 0.0, n))
            .input("coef", coef, 1)
            .floats([h.lr, h.momentum, h.weight_decay])
            .flag(h.nesterov)
            .flag(first_step)
            .ints([("elements", n)])
            .launch(n)
    }

    /// One AdamW update (crate::optim::adamw_step, bit for bit: the same f32 coefficients are
    /// derived on the host from `step`, the parameter's step count after the increment, ≥ 1):
    /// gradient scale `coef[0]` read on the device, then `params_t = cast_T(params)` when given.
    /// One launch per weight-decay segment. Shapes: `params`, `grads`, `exp_avg`, `exp_avg_sq`,
    /// `params_t` `(len)`; `coef` `(1)`. Grid: one thread per element.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_update<T: Compute>(
        &self,
        params: &mut impl DevicePtrMut<f32>,
        params_t: Option<&mut CudaViewMutT<'_, T>>,
        grads: &impl DevicePtr<f32>,
        [exp_avg, exp_avg_sq]: [&mut impl DevicePtrMut<f32>; 2],
        coef: &impl DevicePtr<f32>,
        step: u64,
        h: &AdamWHyper,
    ) -> Result<()> {
        const K: &str = "adamw_update";
        if step == 0 {
            return Err(shape(K, "step counts from 1".into()));
        }
        let n = params.len();
        let AdamCoef {
            decay,
            one_m_b1,
            b2,
            one_m_b2,
            inv_bc2_sqrt,
            eps,
            step_size,
        } = AdamCoef::new(step, h);
        self.typed::<T>(K)
            .output("params", params, n)
            .output_opt("params_t", params_t, n)
            .input("grads", grads, n)
            .output("exp_avg", exp_avg, n)
            .output("exp_avg_sq", exp_avg_sq, n)
            .input("coef", coef, 1)
            .floats([decay, one_m_b1, b2, one_m_b2, inv_bc2_sqrt, eps, step_size])
            .flag(h.weight_decay != 0.0)
            .ints([("elements", n)])
            .launch(n)
    }

    /// `x *= s` (e.g. un-scaling f16 gradients). Grid: one thread per element.
    pub fn scale_grads(&self, x: &mut impl DevicePtrMut<f32>, s: f32) -> Result<()> {
        let n = x.len();
        self.plain("scale_inplace")
            .output("x", x, n)
            .floats([s])
            .ints([("elements", n)])
            .launch(n)
    }
}
