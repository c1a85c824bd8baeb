//! Dynamic loss scaling for f16 forwards (the reference trains with apex O2, initial scale 2^20;
//! <https://arxiv.org/abs/2106.14448>).
//!
//! The loss is multiplied by `scale` before the backward pass so that small f16 gradients do
//! not underflow; the f32 master gradients are multiplied by `1/scale` afterwards. If any
//! gradient is inf/NaN the update is skipped and `scale ← scale · backoff` (½); after
//! `growth_interval` consecutive clean updates `scale ← scale · growth` (2), capped at
//! `max_scale`. bf16 and f32 need no scaling (scale stays 1).

use serde::{Deserialize, Serialize};

/// Loss-scaler configuration. `Default`: initial scale 2^20 (the reference), growth ×2 every
/// 2000 clean updates (apex's window), backoff ×½, bounds [1, 2^24].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalerConfig {
    /// Initial scale.
    pub init_scale: f64,
    /// Multiplier after `growth_interval` clean updates.
    pub growth_factor: f64,
    /// Multiplier after an overflow.
    pub backoff_factor: f64,
    /// Clean updates between growths.
    pub growth_interval: u64,
    /// Lower bound of the scale.
    pub min_scale: f64,
    /// Upper bound of the scale.
    pub max_scale: f64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: (1u64 << 20) as f64,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min_scale: 1.0,
            max_scale: (1u64 << 24) as f64,
        }
    }
}

/// The scaler's checkpointed state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// Whether scaling is active (f16 only).
    pub enabled: bool,
    /// Current scale (1 when disabled).
    pub scale: f64,
    /// Clean updates since the last growth or overflow.
    pub clean_steps: u64,
    /// Updates skipped because of inf/NaN gradients, over the whole run.
    pub skipped: u64,
}

/// Dynamic loss scaler.
#[derive(Debug, Clone)]
pub struct LossScaler {
    cfg: ScalerConfig,
    state: ScalerState,
}

impl LossScaler {
    /// A scaler; when `!enabled` the scale is 1 and [`LossScaler::update`] never skips.
    pub fn new(cfg: ScalerConfig, enabled: bool) -> Self {
        let scale = if enabled { cfg.init_scale } else { 1.0 };
        Self {
            cfg,
            state: ScalerState {
                enabled,
                scale,
                clean_steps: 0,
                skipped: 0,
            },
        }
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// Whether scaling is active.
    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// Updates skipped so far.
    pub fn skipped(&self) -> u64 {
        self.state.skipped
    }

    /// Records the outcome of one update; returns `true` when the update must be skipped
    /// (only when enabled and `found_inf`).
    pub fn update(&mut self, found_inf: bool) -> bool {
        if !self.state.enabled {
            return false;
        }
        if found_inf {
            self.state.scale = (self.state.scale * self.cfg.backoff_factor).max(self.cfg.min_scale);
            self.state.clean_steps = 0;
            self.state.skipped += 1;
            return true;
        }
        self.state.clean_steps += 1;
        if self.state.clean_steps >= self.cfg.growth_interval {
            self.state.scale = (self.state.scale * self.cfg.growth_factor).min(self.cfg.max_scale);
            self.state.clean_steps = 0;
        }
        false
    }

    /// The state to checkpoint.
    pub fn state(&self) -> ScalerState {
        self.state
    }

    /// Restores a checkpointed state.
    pub fn set_state(&mut self, s: ScalerState) {
        self.state = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_skip_and_growth() {
        let cfg = ScalerConfig {
            init_scale: 1024.0,
            growth_interval: 3,
            ..Default::default()
        };
        let mut s = LossScaler::new(cfg, true);
        assert!(s.update(true));
        assert_eq!((s.scale(), s.skipped()), (512.0, 1));
        assert!(!s.update(false));
        assert!(!s.update(false));
        assert_eq!(s.scale(), 512.0);
        assert!(!s.update(false));
        assert_eq!(s.scale(), 1024.0);
        let mut off = LossScaler::new(cfg, false);
        assert!(!off.update(true));
        assert_eq!((off.scale(), off.skipped()), (1.0, 0));
    }
}
