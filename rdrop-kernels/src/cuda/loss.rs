//! Launcher of `loss.cu`.

use super::launch::THREADS;
use super::{dims, shape, CudaKernels, DevicePtr, DevicePtrMut, Result, LOSS_HEADER};
use crate::loss::{LossConfig, LossMode};

impl CudaKernels {
    /// Output length (f64 elements) of [`Self::rdrop_loss`] for `m` samples:
    /// [`LOSS_HEADER`] + 3 per sample.
    pub fn rdrop_loss_out_len(m: usize) -> usize {
        LOSS_HEADER + 3 * m
    }

    /// The R-Drop loss and its gradient (crate::loss::rdrop_loss, in f64): `logits` `(2m, C)`
    /// f32, pass-0 rows then pass-1 rows; `labels` `(m)` u32; `dlogits` `(2m, C)` f32 =
    /// `weight · ∂loss/∂logits` (overwritten). `out` (f64, [`Self::rdrop_loss_out_len`]):
    /// `out[0..4] = [loss, ce, kl, bad_labels]` (the terms as crate::loss::LossValue), then the
    /// per-sample `(ce_i, D_i, bad)` partials. A label `≥ C` is counted in `bad_labels` (the
    /// caller must treat the step as failed: its row's gradient is NaN), never read out of
    /// bounds. Grids: one warp per sample (32 lanes, f64 partials combined in a fixed
    /// butterfly); one warp for the sums over samples (in sample order).
    #[allow(clippy::too_many_arguments)]
    pub fn rdrop_loss(
        &self,
        dlogits: &mut impl DevicePtrMut<f32>,
        out: &mut impl DevicePtrMut<f64>,
        logits: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<u32>,
        [m, classes]: [usize; 2],
        cfg: &LossConfig,
        weight: f32,
    ) -> Result<()> {
        const K: &str = "rdrop_loss_rows";
        if classes == 0 {
            return Err(shape(K, "no classes".into()));
        }
        let ls = cfg.label_smoothing;
        if !(0.0..1.0).contains(&ls) {
            return Err(shape(
                K,
                format!("label smoothing must be in [0, 1), got {ls}"),
            ));
        }
        let n = dims(K, &[2, m, classes])?;
        let mm = m.max(1) as f64;
        let (ce_w, kl_w) = match cfg.mode {
            LossMode::Mean => (0.5 / mm, 0.5 / mm),
            LossMode::Reference => (1.0 / mm, 1.0),
        };
        self.plain(K)
            .output("dlogits", dlogits, n)
            .output("out", out, Self::rdrop_loss_out_len(m))
            .input("logits", logits, n)
            .input("labels", labels, m)
            .ints([("m", m), ("classes", classes)])
            .doubles([ls, ce_w, cfg.alpha * kl_w, weight as f64])
            .launch_grid(m.div_ceil(8), THREADS, m == 0)?;
        self.plain("rdrop_loss_finish")
            .output("out", out, Self::rdrop_loss_out_len(m))
            .ints([("m", m)])
            .doubles([ce_w, kl_w, cfg.alpha])
            .launch_grid(1, 32, false)
    }
}
