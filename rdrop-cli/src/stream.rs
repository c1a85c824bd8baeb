//! The training micro-batches in the one-process order, and one rank's share of each update.
//!
//! One process reads an epoch's micro-batches in order, across epochs; an update takes the
//! next `W × a` of them: the global batch, `batch_size = W × micro_batch × a` images. Rank `r`
//! of `W` takes the contiguous images `shard(batch_size, W, r)` of it, which are the
//! micro-batches `r·a .. (r+1)·a` of the update. So the ranks together read exactly the
//! images one process reads, and the [`Position`] (the next micro-batch) is the same on every
//! rank and in a one-process run: a checkpoint resumes on any world size that divides the
//! batch, with the same data order. Batches are prepared ahead on a background thread.

use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{bounded, Receiver};
use rdrop_data::{Batch, Loader};

/// Where the loader is: the next micro-batch to read, `index` of `epoch` (`index` may equal
/// the epoch's length: the next read starts the next epoch, as a checkpoint records it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// Epoch of the last micro-batch read (0-based).
    pub epoch: u64,
    /// Next micro-batch of that epoch.
    pub index: usize,
}

impl Position {
    /// Reads one micro-batch: returns its `(epoch, index)` and moves past it; an epoch of
    /// `per_epoch` micro-batches rolls over to the next one when it is used up.
    pub fn take(&mut self, per_epoch: usize) -> (u64, usize) {
        if self.index >= per_epoch {
            *self = Position {
                epoch: self.epoch + 1,
                index: 0,
            };
        }
        let at = (self.epoch, self.index);
        self.index += 1;
        at
    }
}

/// Who reads what: `world` ranks, this one `rank`, `accumulation` micro-batches each per update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Ranks.
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// Micro-batches per rank per update (`batch_size / (world × micro_batch)`).
    pub accumulation: usize,
}

impl Share {
    /// The `(epoch, index)` of the micro-batches this rank reads in the update that starts at
    /// `pos`, and moves `pos` past the whole global batch.
    pub fn update(&self, pos: &mut Position, per_epoch: usize) -> Vec<(u64, usize)> {
        let a = self.accumulation;
        let micro_batches = self.world * a;
        let mine = rdrop_core::dist::shard(micro_batches, self.world, self.rank);
        (0..micro_batches)
            .map(|k| (k, pos.take(per_epoch)))
            .filter(|(k, _)| mine.contains(k))
            .map(|(_, at)| at)
            .collect()
    }
}

/// The rank's micro-batches of each update, from any position, prepared ahead.
pub struct Stream {
    /// The position after the last update handed out (the same on every rank).
    pub pos: Position,
    share: Share,
    per_epoch: usize,
    rx: Receiver<anyhow::Result<Batch>>,
}

impl Stream {
    /// Reads `loader`'s micro-batches from `pos` on, this rank's `share` of each update.
    pub fn new(loader: Arc<Loader>, pos: Position, share: Share) -> anyhow::Result<Self> {
        let per_epoch = loader.batches_per_epoch();
        let (tx, rx) = bounded(loader.config().prefetch.max(share.accumulation));
        std::thread::Builder::new()
            .name("rdrop-train-batches".into())
            .spawn(move || {
                let mut at = pos;
                loop {
                    for (epoch, index) in share.update(&mut at, per_epoch) {
                        let b = loader.batch(epoch, index).with_context(|| {
                            format!("reading training batch {index} of epoch {epoch}")
                        });
                        let failed = b.is_err();
                        if tx.send(b).is_err() || failed {
                            return;
                        }
                    }
                }
            })
            .context("starting the training-batch thread")?;
        Ok(Self {
            pos,
            share,
            per_epoch,
            rx,
        })
    }

    /// This rank's micro-batches of the next update, as `(images, labels)` tensors on `device`.
    pub fn next_update(&mut self, device: &Device) -> anyhow::Result<Vec<(Tensor, Tensor)>> {
        let mine = self.share.update(&mut self.pos, self.per_epoch);
        mine.iter()
            .map(|_| {
                let batch = self
                    .rx
                    .recv()
                    .context("the training-batch thread stopped")??;
                Ok(batch.to_tensors(DType::F32, device)?)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_roll_over_lazily_as_one_process_reads() {
        let mut p = Position::default();
        let seen: Vec<_> = (0..7).map(|_| p.take(3)).collect();
        assert_eq!(
            seen,
            vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
        );
        assert_eq!(p, Position { epoch: 2, index: 1 });
        // After the epoch's last batch the position stays in that epoch (index = length).
        let mut q = Position { epoch: 0, index: 2 };
        q.take(3);
        assert_eq!(q, Position { epoch: 0, index: 3 });
    }

    /// Every rank's micro-batches, over updates that straddle epochs, are exactly the
    /// one-process micro-batches of each update, each once, and every rank ends at the same
    /// position as the one process.
    #[test]
    fn ranks_together_read_the_one_process_order() {
        let per_epoch = 5;
        for (world, a) in [(1, 3), (2, 1), (2, 2), (3, 1), (4, 2)] {
            let mut one = Position::default();
            let mut ranks = vec![Position::default(); world];
            for _ in 0..7 {
                let single = Share {
                    world: 1,
                    rank: 0,
                    accumulation: world * a,
                };
                let all = single.update(&mut one, per_epoch);
                let mut got = Vec::new();
                for (r, pos) in ranks.iter_mut().enumerate() {
                    let s = Share {
                        world,
                        rank: r,
                        accumulation: a,
                    };
                    let mine = s.update(pos, per_epoch);
                    assert_eq!(mine.len(), a);
                    got.extend(mine);
                    assert_eq!(*pos, one, "world {world}: positions agree");
                }
                assert_eq!(got, all, "world {world} × {a}");
            }
        }
    }
}
