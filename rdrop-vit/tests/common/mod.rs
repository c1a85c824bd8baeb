//! Helpers shared by the data-parallel test files (`mod common;` in each).
#![allow(dead_code)] // each test file uses a part

use candle_core::Tensor;
use rdrop_core::{LossConfig, LossMode, OptimConfig, ScheduleConfig, TrainConfig};

/// The data-parallel tests' update: α = 1, SGD with momentum at lr 0.05 with clipping, no
/// warm-up, and a gradient bucket per block (the tiny ViT's blocks are ~34 KB), so that the
/// overlapped path runs with every cut in use.
pub fn train_cfg(
    mode: LossMode,
    accum: usize,
    label_smoothing: f64,
    weight_decay: f64,
) -> TrainConfig {
    TrainConfig {
        loss: LossConfig {
            alpha: 1.0,
            mode,
            label_smoothing,
        },
        optim: OptimConfig {
            lr: 0.05,
            weight_decay,
            ..OptimConfig::default()
        },
        schedule: ScheduleConfig {
            warmup_steps: 0,
            total_steps: 10,
            ..ScheduleConfig::default()
        },
        clip_norm: Some(1.0),
        accum_steps: accum,
        grad_bucket_mb: 1e-9,
        ..TrainConfig::default()
    }
}

/// Rows `range` of a global batch cut into `accum` micro-batches, in order.
pub fn micro_batches(
    (x, y): &(Tensor, Tensor),
    range: std::ops::Range<usize>,
    accum: usize,
) -> Vec<(Tensor, Tensor)> {
    let m = range.len() / accum;
    (0..accum)
        .map(|j| {
            let start = range.start + j * m;
            (
                x.narrow(0, start, m).unwrap(),
                y.narrow(0, start, m).unwrap(),
            )
        })
        .collect()
}
