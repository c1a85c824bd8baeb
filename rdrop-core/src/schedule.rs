//! Learning-rate schedules: linear warm-up, then cosine or linear decay to 0, exactly as the
//! reference code's `WarmupCosineSchedule` / `WarmupLinearSchedule` (ViT-pytorch
//! `utils/scheduler.py`, used by the R-Drop ViT code, <https://arxiv.org/abs/2106.14448>).
//!
//! With `w = warmup_steps`, `T = total_steps`:
//! ```text
//! lr_lambda(k) = k / max(1, w)                                        if k < w
//! cosine:        max(0, ½ (1 + cos(π · cycles · 2 · progress)))       otherwise
//! linear:        max(0, (T − k) / max(1, T − w))                      otherwise
//! constant:      1                                                     otherwise
//!   progress = (k − w) / max(1, T − w)
//! ```
//! The reference calls `scheduler.step()` *before* `optimizer.step()`, so the k-th update
//! (k = 1..T) uses `lr · lr_lambda(k)`: the first update already has `1/w` of the base rate and
//! the last one (k = T, cosine with cycles ½) has rate 0.

use serde::{Deserialize, Serialize};

/// The decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DecayKind {
    /// `WarmupCosineSchedule` (the recipe).
    #[default]
    Cosine,
    /// `WarmupLinearSchedule`.
    Linear,
    /// Warm-up, then the constant base rate.
    Constant,
}

/// Schedule configuration. `Default` is the recipe: warm-up 500, cosine (cycles ½), 10000 steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Decay after warm-up.
    pub decay: DecayKind,
    /// Number of warm-up updates `w`.
    pub warmup_steps: u64,
    /// Total number of updates `T`.
    pub total_steps: u64,
    /// Cosine cycles (the reference's `cycles=.5`: half a cosine, from 1 down to 0).
    pub cycles: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            decay: DecayKind::Cosine,
            warmup_steps: 500,
            total_steps: 10_000,
            cycles: 0.5,
        }
    }
}

/// The learning-rate multiplier of update `step` (k = 1..T): pure, see the module docs.
pub fn lr_lambda(step: u64, cfg: &ScheduleConfig) -> f64 {
    let w = cfg.warmup_steps;
    if step < w {
        return step as f64 / (w.max(1)) as f64;
    }
    let denom = cfg.total_steps.saturating_sub(w).max(1) as f64;
    match cfg.decay {
        DecayKind::Cosine => {
            let progress = (step - w) as f64 / denom;
            (0.5 * (1.0 + (std::f64::consts::PI * cfg.cycles * 2.0 * progress).cos())).max(0.0)
        }
        DecayKind::Linear => ((cfg.total_steps as f64 - step as f64) / denom).max(0.0),
        DecayKind::Constant => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_of_the_recipe_schedule() {
        let c = ScheduleConfig::default();
        assert_eq!(lr_lambda(0, &c), 0.0);
        assert_eq!(lr_lambda(1, &c), 1.0 / 500.0);
        assert_eq!(lr_lambda(500, &c), 1.0);
        assert!(lr_lambda(10_000, &c).abs() < 1e-15);
        assert!((lr_lambda(5250, &c) - 0.5).abs() < 1e-12);
        let l = ScheduleConfig {
            decay: DecayKind::Linear,
            ..c
        };
        assert!((lr_lambda(5250, &l) - 0.5).abs() < 1e-12);
        assert_eq!(lr_lambda(20_000, &l), 0.0);
        let k = ScheduleConfig {
            decay: DecayKind::Constant,
            ..c
        };
        assert_eq!(lr_lambda(9999, &k), 1.0);
        let nw = ScheduleConfig {
            warmup_steps: 0,
            ..c
        };
        assert_eq!(lr_lambda(0, &nw), 1.0);
    }
}
