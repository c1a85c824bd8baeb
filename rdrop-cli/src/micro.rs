//! `--micro-batch auto`: the micro-batch a run takes on the device it opened.
//!
//! On CUDA with the explicit engine: the largest divisor of the per-rank batch whose
//! activation plan, with the engine's parameters, gradients and moments, fits the GPU's free
//! memory less a margin (`rdrop_vit::engine::cuda::fit`), decided after the model is on the
//! GPU and before the engine allocates anything. Elsewhere (the CPU, the autograd model, whose
//! memory is not planned): the largest divisor not above 64.

use candle_core::Device;
use rdrop_core::{OptimizerKind, Precision};
use rdrop_vit::engine::cuda::fit::{self, Fit};
use rdrop_vit::ViTConfig;

use crate::config::RunConfig;

/// The micro-batch when memory does not decide.
pub const DEFAULT_CAP: usize = 64;

/// A decision and how it was reached (for the run's header).
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Samples per micro-batch.
    pub micro_batch: usize,
    /// The figures: `micro-batch auto: 96 (plan 30.1 GiB + engine 1.1 GiB ≤ 73.2 GiB free − 4.9
    /// GiB margin)`.
    pub why: String,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The largest divisor of `n` not above `cap`.
pub fn largest_divisor_upto(n: usize, cap: usize) -> usize {
    (1..=cap.min(n).max(1))
        .rev()
        .find(|d| n.is_multiple_of(*d))
        .unwrap_or(1)
}

/// Free and total bytes of the GPU behind `device` (`None` on the CPU).
pub fn gpu_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Ok(cd) = device.as_cuda_device() {
        let (free, total) = cd.cuda_stream().context().mem_get_info().ok()?;
        return Some((free as u64, total as u64));
    }
    let _ = device;
    None
}

/// Optimiser buffers of the same size as the parameters.
pub fn moments(cfg: &RunConfig) -> usize {
    match cfg.optimizer {
        OptimizerKind::AdamW => 2,
        _ if cfg.momentum != 0.0 => 1,
        _ => 0,
    }
}

/// The micro-batch for `per_rank_batch` samples per rank. `memory`: the GPU's free and total
/// bytes when the explicit CUDA engine will run, else `None`; `model_on_gpu`: whether the
/// model the CLI keeps is already out of `free` (a run decides then; `--dry-run` before).
/// Errors when the GPU cannot hold even one sample, with the figures.
pub fn choose(
    vc: &ViTConfig,
    cfg: &RunConfig,
    precision: Precision,
    per_rank_batch: usize,
    memory: Option<(u64, u64)>,
    gpu_name: &str,
    model_on_gpu: bool,
) -> anyhow::Result<Choice> {
    let Some((free, total)) = memory else {
        let m = largest_divisor_upto(per_rank_batch, DEFAULT_CAP);
        return Ok(Choice {
            micro_batch: m,
            why: format!(
                "micro-batch auto: {m} (the largest divisor of {per_rank_batch} up to \
                 {DEFAULT_CAP}; memory is planned only for the explicit engine on CUDA)"
            ),
        });
    };
    let elem = precision.dtype().size_in_bytes();
    let state = fit::state_bytes(vc.num_params(), elem, moments(cfg), !model_on_gpu);
    match fit::largest_micro_batch(vc, elem, per_rank_batch, state, free, total) {
        Ok(f) => Ok(Choice {
            micro_batch: f.micro_batch,
            why: describe(&f, per_rank_batch, precision),
        }),
        Err(f) => anyhow::bail!(
            "micro-batch auto: not even 1 sample fits {gpu_name}: the engine's parameters, \
             gradients and moments ({}) and the plan of one sample ({}) need {}, but {} is free \
             less a margin of {} = {}; use a GPU with more memory, a smaller model or image size",
            gib(f.state),
            gib(f.plan),
            gib(f.need()),
            gib(f.free),
            gib(f.margin),
            gib(f.budget())
        ),
    }
}

/// The header's line for a fit.
pub fn describe(f: &Fit, per_rank_batch: usize, precision: Precision) -> String {
    format!(
        "micro-batch auto: {} of {per_rank_batch} per rank (activation plan {} + engine state \
         {} = {} of {} free less a {} margin, {precision})",
        f.micro_batch,
        gib(f.plan),
        gib(f.state),
        gib(f.need()),
        gib(f.free),
        gib(f.margin)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_planned_gpu_the_cap_applies() {
        assert_eq!(largest_divisor_upto(512, 64), 64);
        assert_eq!(largest_divisor_upto(96, 64), 48);
        assert_eq!(largest_divisor_upto(7, 64), 7);
        assert_eq!(largest_divisor_upto(1, 64), 1);
        let cfg = RunConfig::default();
        let vc = ViTConfig::preset("vit-b16").unwrap();
        let c = choose(&vc, &cfg, Precision::F32, 200, None, "cpu", true).unwrap();
        assert_eq!(c.micro_batch, 50);
        assert!(c.why.contains("up to 64"), "{}", c.why);
    }

    #[test]
    fn a_gpu_decides_by_its_memory_and_refuses_when_nothing_fits() {
        let cfg = RunConfig::default();
        let vc = ViTConfig::preset("vit-b16").unwrap();
        const GIB: u64 = 1 << 30;
        let mem = |g: u64| Some(((g * GIB) - GIB, g * GIB));
        let c16 = choose(&vc, &cfg, Precision::F16, 512, mem(16), "v100", true).unwrap();
        let c80 = choose(&vc, &cfg, Precision::Bf16, 512, mem(80), "h100", true).unwrap();
        assert!(c80.micro_batch > c16.micro_batch && 512 % c16.micro_batch == 0);
        assert!(c80.why.contains("of 512 per rank"), "{}", c80.why);
        let e = choose(
            &vc,
            &cfg,
            Precision::Bf16,
            512,
            Some((GIB, GIB)),
            "tiny GPU",
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not even 1 sample fits tiny GPU") && e.contains("GiB"),
            "{e}"
        );
    }
}
