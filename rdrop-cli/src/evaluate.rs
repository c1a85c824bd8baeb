//! Evaluation on a test split: top-1, top-5 and mean cross-entropy of a model's logits,
//! shared by `rdrop eval` and the evaluations during `rdrop train`. In a data-parallel run each
//! rank evaluates a contiguous share of the test batches and the counts and loss sums are
//! summed over the ranks, so every rank gets the one-process result (the loss up to the order
//! of the f64 sums).

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use rdrop_core::loss::cross_entropy;
use rdrop_data::Loader;
use serde::Serialize;

use crate::world::World;

/// The result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    /// Fraction of images whose top prediction is the label.
    pub top1: f64,
    /// Fraction whose label is among the 5 highest logits (all of them if fewer classes).
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Images evaluated.
    pub n: usize,
}

/// Running sums of correct predictions and cross-entropy over batches of logits.
#[derive(Debug, Default, Clone)]
pub struct Accumulator {
    top1: usize,
    top5: usize,
    loss: f64,
    n: usize,
}

impl Accumulator {
    /// Adds one batch: `logits` rows (one per image) and the labels. Rows whose label is out
    /// of range are skipped. The loss is rdrop-core's cross-entropy, in f64.
    pub fn add(&mut self, logits: &[Vec<f32>], labels: &[u32]) -> candle_core::Result<()> {
        let (mut rows, mut ys) = (Vec::new(), Vec::new());
        for (row, &y) in logits.iter().zip(labels) {
            let Some(&target) = row.get(y as usize) else {
                continue;
            };
            // Rank of the label: how many logits beat it (ties count in the label's favour).
            let above = row.iter().filter(|&&v| v > target).count();
            self.top1 += usize::from(above == 0);
            self.top5 += usize::from(above < 5);
            rows.extend(row.iter().map(|&v| f64::from(v)));
            ys.push(y);
        }
        if ys.is_empty() {
            return Ok(());
        }
        let n = ys.len();
        let x = Tensor::from_vec(rows, (n, logits[0].len()), &Device::Cpu)?;
        let y = Tensor::from_vec(ys, n, &Device::Cpu)?;
        let mean = cross_entropy(&x, &y)?.to_scalar::<f64>()?;
        self.loss += mean * n as f64;
        self.n += n;
        Ok(())
    }

    /// Sums the counts and loss sums of every rank (in rank order), so that each holds the
    /// whole split's.
    pub fn reduce(&mut self, world: &World) -> anyhow::Result<()> {
        let mut v = [self.top1 as f64, self.top5 as f64, self.loss, self.n as f64];
        world.sum(&mut v)?;
        // Counts are integers below 2^53: exact in f64.
        (self.top1, self.top5, self.loss, self.n) =
            (v[0] as usize, v[1] as usize, v[2], v[3] as usize);
        Ok(())
    }

    /// The fractions and mean loss so far.
    pub fn result(&self) -> EvalResult {
        let n = self.n.max(1) as f64;
        EvalResult {
            top1: self.top1 as f64 / n,
            top5: self.top5 as f64 / n,
            loss: self.loss / n,
            n: self.n,
        }
    }
}

/// Evaluates a model, given as its eval-mode (dropout off) `logits` function, on every image
/// of `loader`'s epoch 0: this rank's batches `shard(batches, world, rank)`, reduced over the
/// ranks.
pub fn evaluate(
    mut logits: impl FnMut(&Tensor) -> anyhow::Result<Tensor>,
    loader: &Loader,
    device: &Device,
    world: &World,
) -> anyhow::Result<EvalResult> {
    let mut acc = Accumulator::default();
    let mine = rdrop_core::dist::shard(loader.batches_per_epoch(), world.size(), world.rank());
    for batch in loader.epoch(0, mine.start).take(mine.len()) {
        let batch = batch.context("reading a test batch")?;
        let (x, _) = batch.to_tensors(DType::F32, device)?;
        let logits = logits(&x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        acc.add(&logits, &batch.labels)?;
    }
    acc.reduce(world)?;
    Ok(acc.result())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_counts_top1_top5_and_loss() {
        let mut a = Accumulator::default();
        let rows = vec![
            vec![3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], // label 0: top-1
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], // label 2: rank 4 → top-5 only
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], // label 1: rank 5 → neither
        ];
        a.add(&rows, &[0, 2, 1]).unwrap();
        let r = a.result();
        assert_eq!(r.n, 3);
        assert!((r.top1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.top5 - 2.0 / 3.0).abs() < 1e-12);
        // Cross-entropy of a uniform row over 4 classes is ln 4.
        let mut u = Accumulator::default();
        u.add(&[vec![0.5; 4]], &[2]).unwrap();
        assert!((u.result().loss - 4f64.ln()).abs() < 1e-9);
    }
}
