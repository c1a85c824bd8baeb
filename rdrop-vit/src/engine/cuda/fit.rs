//! The largest micro-batch that fits a GPU, from the plan's closed form ([`plan_bytes`]) and
//! the memory the driver reports: no trial run, nothing allocated to find out.
//!
//! ```text
//! need(m)   = state + plan_bytes(cfg, 2m, s, train)      (R-Drop: 2m rows)
//! state     = P·(4 + s + 4 + 4·moments) [+ 4·P] + W       f32 master, T copy, f32 gradients,
//!                                                          optimiser moments, the f32 model
//!                                                          the CLI keeps, cuBLASLt workspace
//! margin    = max(total / 16, 512 MiB)                    fragmentation, the batch's upload,
//!                                                          candle's and NCCL's buffers
//! chosen m  = the largest divisor of the per-rank batch with need(m) ≤ free − margin
//! ```
//! `free` is measured once the device is open (the CUDA context and anything else on the GPU
//! are already out of it).

use super::plan::plan_bytes;
use crate::config::ViTConfig;

/// The least memory kept free.
pub const MIN_MARGIN: u64 = 512 << 20;

/// What is kept free of a GPU of `total` bytes: a sixteenth, at least [`MIN_MARGIN`].
pub fn margin(total: u64) -> u64 {
    (total / 16).max(MIN_MARGIN)
}

/// Bytes a training run keeps on the GPU besides its plan: for `params` parameters at
/// `elem`-byte compute elements with `moments` optimiser buffers (SGD with momentum 1, AdamW
/// 2), the f32 master weights, their compute copy, the f32 gradients, the moments, the
/// cuBLASLt workspace and, with `model_copy`, the f32 model the CLI keeps (leave it out when
/// the model is already on the GPU: `free` then excludes it).
pub fn state_bytes(params: usize, elem: usize, moments: usize, model_copy: bool) -> u64 {
    let p = params as u64;
    let model = if model_copy { 4 } else { 0 };
    p * (4 + elem as u64 + 4 + 4 * moments as u64 + model)
        + super::plan::GEMM_WORKSPACE_BYTES as u64
}

/// A micro-batch and its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// Samples per micro-batch (each runs two rows).
    pub micro_batch: usize,
    /// Its activation plan, bytes.
    pub plan: u64,
    /// [`state_bytes`].
    pub state: u64,
    /// Free memory when decided.
    pub free: u64,
    /// [`margin`] of the GPU's total memory.
    pub margin: u64,
}

impl Fit {
    /// Bytes the run needs: state and plan.
    pub fn need(&self) -> u64 {
        self.state + self.plan
    }

    /// What may be used: free minus the margin.
    pub fn budget(&self) -> u64 {
        self.free.saturating_sub(self.margin)
    }
}

/// The largest divisor of `per_rank_batch` whose training plan at `elem`-byte elements, with
/// `state` bytes beside it, fits `free` bytes less the margin of a `total`-byte GPU. `Err`
/// holds the figures of the smallest micro-batch (1) when even it does not fit.
pub fn largest_micro_batch(
    cfg: &ViTConfig,
    elem: usize,
    per_rank_batch: usize,
    state: u64,
    free: u64,
    total: u64,
) -> Result<Fit, Fit> {
    let at = |m: usize| Fit {
        micro_batch: m,
        plan: plan_bytes(cfg, 2 * m, elem, true) as u64,
        state,
        free,
        margin: margin(total),
    };
    (1..=per_rank_batch.max(1))
        .rev()
        .filter(|m| per_rank_batch.is_multiple_of(*m))
        .map(at)
        .find(|f| f.need() <= f.budget())
        .ok_or_else(|| at(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_choice_is_the_largest_divisor_that_fits_and_the_next_does_not() {
        let cfg = ViTConfig::preset("vit-b16").unwrap();
        let state = state_bytes(cfg.num_params(), 2, 1, true);
        for total in [16 * GIB, 24 * GIB, 40 * GIB, 80 * GIB] {
            let free = total - GIB / 2;
            let f = largest_micro_batch(&cfg, 2, 512, state, free, total).unwrap();
            assert!(512 % f.micro_batch == 0);
            assert!(f.need() <= f.budget());
            // Every larger divisor needs more than the budget.
            for m in (f.micro_batch + 1..=512).filter(|m| 512 % m == 0) {
                let need = state + plan_bytes(&cfg, 2 * m, 2, true) as u64;
                assert!(need > f.budget(), "{m} would fit {total}");
            }
        }
        // More memory never chooses less.
        let small = largest_micro_batch(&cfg, 2, 512, state, 15 * GIB, 16 * GIB).unwrap();
        let big = largest_micro_batch(&cfg, 2, 512, state, 79 * GIB, 80 * GIB).unwrap();
        assert!(big.micro_batch > small.micro_batch);
        // f32 elements take more room than bf16.
        let f32_fit = largest_micro_batch(&cfg, 4, 512, state, 79 * GIB, 80 * GIB).unwrap();
        assert!(f32_fit.micro_batch <= big.micro_batch);
    }

    #[test]
    fn nothing_fits_a_gpu_smaller_than_the_state() {
        let cfg = ViTConfig::preset("vit-b16").unwrap();
        let state = state_bytes(cfg.num_params(), 2, 1, true);
        let e = largest_micro_batch(&cfg, 2, 512, state, GIB, GIB).unwrap_err();
        assert_eq!(e.micro_batch, 1);
        assert!(e.need() > e.budget());
        assert_eq!(e.margin, MIN_MARGIN);
        assert_eq!(margin(80 * GIB), 5 * GIB);
    }

    #[test]
    fn state_counts_each_buffer() {
        // 10 parameters, bf16, SGD momentum: 4 + 2 + 4 + 4 + 4 bytes each, plus the workspace.
        let w = super::super::plan::GEMM_WORKSPACE_BYTES as u64;
        assert_eq!(state_bytes(10, 2, 1, true), 180 + w);
        assert_eq!(state_bytes(10, 4, 2, false), 200 + w);
    }
}
