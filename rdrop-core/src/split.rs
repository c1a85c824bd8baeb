//! How one update's global batch splits over ranks and micro-batches, shared by every trainer
//! (the autograd [`crate::Trainer`], [`crate::FlatTrainer`] and the CUDA engine's), so that they
//! key the dropout masks and weigh the micro-batches identically.
//!
//! Rank `r` of `W` holds `A` micro-batches of sizes `m_j` (`n = Σ_j m_j` samples, the same on
//! every rank; `B = W·n` in the update):
//! ```text
//! first_j = r·n + Σ_{i<j} m_i                  the micro-batch's first sample in the global batch
//! w_j     = m_j / B          (mean)            so that Σ_ranks Σ_j w_j · L_j is the batch mean
//!         = 1 / (A·W)        (reference)       the R-Drop code's average over micro-batches
//! ```
//! One process is `W = 1, r = 0`.

use candle_core::Tensor;

use crate::dist::Collective;
use crate::error::{CoreError, Result};
use crate::loss::LossMode;

/// One update's split: this rank's micro-batches, their first global sample and their weight.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateSplit {
    /// This rank.
    pub rank: usize,
    /// Ranks in the update.
    pub world: usize,
    /// Samples on this rank (`n`).
    pub local: usize,
    /// Samples in the update (`B = W·n`).
    pub total: usize,
    /// Per micro-batch: (its first sample's index in the global batch, its weight `w_j`).
    pub micro: Vec<(usize, f64)>,
}

impl UpdateSplit {
    /// The split of `micro_batches` (`(x, y)`, samples along dimension 0), which must number
    /// `accum_steps` and hold at least one sample, on the rank `collective` names (one process
    /// without one).
    pub fn new(
        micro_batches: &[(Tensor, Tensor)],
        accum_steps: usize,
        mode: LossMode,
        collective: Option<&dyn Collective>,
    ) -> Result<Self> {
        if micro_batches.len() != accum_steps {
            return Err(CoreError::Config(format!(
                "update got {} micro-batches, accum_steps is {accum_steps}",
                micro_batches.len()
            )));
        }
        let sizes = micro_batches
            .iter()
            .map(|(x, _)| x.dim(0))
            .collect::<candle_core::Result<Vec<usize>>>()?;
        Self::from_sizes(&sizes, mode, collective.map(|c| (c.rank(), c.world_size())))
    }

    /// [`UpdateSplit::new`] from the micro-batch sizes and `(rank, world)`.
    pub fn from_sizes(
        sizes: &[usize],
        mode: LossMode,
        rank_world: Option<(usize, usize)>,
    ) -> Result<Self> {
        let local: usize = sizes.iter().sum();
        if local == 0 {
            return Err(CoreError::Config("update got no samples".into()));
        }
        let (rank, world) = rank_world.unwrap_or((0, 1));
        let total = local * world;
        let mut first = rank * local;
        let micro = sizes
            .iter()
            .map(|&m| {
                let w = match mode {
                    LossMode::Mean => m as f64 / total as f64,
                    LossMode::Reference => 1.0 / (sizes.len() * world) as f64,
                };
                let at = (first, w);
                first += m;
                at
            })
            .collect();
        Ok(Self {
            rank,
            world,
            local,
            total,
            micro,
        })
    }

    /// Sums this rank's weighted `[loss, ce, kl]` over the ranks (rank order, the same on every
    /// rank) and checks that the ranks together hold `total` samples.
    pub fn reduce_stats(&self, c: &dyn Collective, stats: [f64; 3]) -> Result<[f64; 3]> {
        let mut v = [stats[0], stats[1], stats[2], self.local as f64];
        c.all_reduce_f64(&mut v)?;
        if v[3] != self.total as f64 {
            return Err(CoreError::Config(format!(
                "the ranks hold {} samples in all, rank {} expected {} × {}: every rank must \
                 get an equal share of the global batch",
                v[3], self.rank, self.world, self.local
            )));
        }
        Ok([v[0], v[1], v[2]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::LocalCollective;

    #[test]
    fn offsets_and_weights_tile_the_global_batch() -> Result<()> {
        // Two ranks of two micro-batches (3 + 5 samples each) = one process of 16 samples.
        let one = UpdateSplit::from_sizes(&[3, 5, 3, 5], LossMode::Mean, None)?;
        let mut firsts = Vec::new();
        let mut wsum = 0.0;
        for r in 0..2 {
            let s = UpdateSplit::from_sizes(&[3, 5], LossMode::Mean, Some((r, 2)))?;
            assert_eq!((s.local, s.total), (8, 16));
            firsts.extend(s.micro.iter().map(|m| m.0));
            wsum += s.micro.iter().map(|m| m.1).sum::<f64>();
        }
        assert_eq!(firsts, one.micro.iter().map(|m| m.0).collect::<Vec<_>>());
        assert_eq!(firsts, vec![0, 3, 8, 11]);
        assert!((wsum - 1.0).abs() < 1e-15);
        let r = UpdateSplit::from_sizes(&[3, 5], LossMode::Reference, Some((1, 2)))?;
        assert_eq!(r.micro, vec![(8, 0.25), (11, 0.25)]);
        Ok(())
    }

    #[test]
    fn bad_counts_are_errors() {
        assert!(UpdateSplit::from_sizes(&[0, 0], LossMode::Mean, None).is_err());
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu);
        let y = Tensor::zeros(2, candle_core::DType::U32, &candle_core::Device::Cpu);
        let mb = vec![(x.unwrap(), y.unwrap())];
        let e = UpdateSplit::new(&mb, 2, LossMode::Mean, None).unwrap_err();
        assert!(e.to_string().contains("accum_steps is 2"), "{e}");
    }

    #[test]
    fn unequal_shares_are_refused_on_every_rank() {
        let ranks = LocalCollective::group(2);
        let out: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(r, c)| {
                    s.spawn(move || {
                        let sizes: &[usize] = if r == 0 { &[4] } else { &[3] };
                        let sp =
                            UpdateSplit::from_sizes(sizes, LossMode::Mean, Some((r, 2))).unwrap();
                        match sp.reduce_stats(c, [1.0, 1.0, 0.0]) {
                            Ok(v) => format!("ok {v:?}"),
                            Err(e) => e.to_string(),
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in out {
            assert!(e.contains("equal share"), "{e}");
        }
    }
}
