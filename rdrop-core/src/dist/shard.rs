//! Which samples each rank takes.
//!
//! A global batch of `B = world × micro × accum` samples (positions `0..B` in the order one
//! process would use) is cut into `world` contiguous slices; rank `r` takes
//! `shard(B, world, r)` and cuts its slice into `accum` micro-batches of `micro`, in order. So
//! rank `r`'s local micro-batch `j` is the single process's micro-batch `r·accum + j` at
//! micro-batch size `micro`, and the sample at local position `i` of rank `r` is global sample
//! `r·B/world + i`: that global index keys its dropout masks.

use std::ops::Range;

use super::error::DistError;

/// Rank `rank`'s contiguous share of `0..len` over `world` ranks, balanced (sizes differ by at
/// most one, the first `len mod world` ranks take one more):
/// ```text
/// q = len / world,  s = len mod world
/// start(r) = r·q + min(r, s),   shard(len, world, r) = start(r) .. start(r + 1)
/// ```
/// The shards of `r = 0..world` partition `0..len` in order. `world = 0` or `rank ≥ world`
/// gives an empty range.
pub fn shard(len: usize, world: usize, rank: usize) -> Range<usize> {
    if world == 0 || rank >= world {
        return 0..0;
    }
    let (q, s) = (len / world, len % world);
    let start = |r: usize| r * q + r.min(s);
    start(rank)..start(rank + 1)
}

/// The micro-batch size of `batch_size = world × micro × accum`; errors when `batch_size` is
/// not a positive multiple of `world × accum` (the message says which sizes would fit).
pub fn micro_batch(batch_size: usize, world: usize, accum: usize) -> Result<usize, DistError> {
    let err = |problem: String| DistError::BatchSplit {
        batch_size,
        world,
        accum,
        problem,
    };
    if world == 0 || accum == 0 {
        return Err(err(
            "the world size and the accumulation steps must be ≥ 1".into()
        ));
    }
    let per = world
        .checked_mul(accum)
        .ok_or_else(|| err("world × accumulation overflows".into()))?;
    if batch_size == 0 || !batch_size.is_multiple_of(per) {
        let lower = (batch_size / per) * per;
        let hint = if lower > 0 {
            format!("{lower} or {}", lower + per)
        } else {
            per.to_string()
        };
        return Err(err(format!(
            "{batch_size} is not a positive multiple of {world} × {accum} = {per} (e.g. use a \
             batch size of {hint}, or change the accumulation steps or the number of ranks)"
        )));
    }
    Ok(batch_size / per)
}

/// Checks `batch_size == world × micro × accum`.
pub fn check_batch(
    batch_size: usize,
    world: usize,
    micro: usize,
    accum: usize,
) -> Result<(), DistError> {
    let m = micro_batch(batch_size, world, accum)?;
    if m != micro {
        return Err(DistError::BatchSplit {
            batch_size,
            world,
            accum,
            problem: format!(
                "the micro-batch is {micro}, so the batch size would be {}; with this batch \
                 size the micro-batch is {m}",
                world * micro * accum
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_in_order_and_balance() {
        for len in [0usize, 1, 5, 7, 64, 100, 1001] {
            for world in 1..=9 {
                let shards: Vec<Range<usize>> = (0..world).map(|r| shard(len, world, r)).collect();
                // Contiguous, in rank order, covering 0..len exactly once.
                assert_eq!(shards[0].start, 0);
                assert_eq!(shards[world - 1].end, len);
                for w in shards.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "len {len} world {world}");
                }
                let sizes: Vec<usize> = shards.iter().map(|s| s.len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "len {len} world {world}: {sizes:?}");
                assert_eq!(sizes.iter().sum::<usize>(), len);
            }
        }
        assert_eq!(shard(10, 3, 0), 0..4);
        assert_eq!(shard(10, 3, 2), 7..10);
        assert_eq!(shard(10, 0, 0), 0..0);
        assert_eq!(shard(10, 2, 2), 0..0);
    }

    /// An epoch of global batches, each split over ranks and then into micro-batches: every
    /// sample exactly once, equal shares, and each rank's micro-batch `j` is the single
    /// process's micro-batch `r·accum + j`.
    #[test]
    fn every_sample_of_an_epoch_once_over_ranks_and_updates() {
        let epoch = 96;
        for (batch, world, accum) in [(32, 2, 2), (48, 4, 3), (24, 3, 1), (96, 8, 2), (16, 1, 4)] {
            let micro = micro_batch(batch, world, accum).unwrap();
            let order: Vec<usize> = (0..epoch).map(|i| (i * 37 + 11) % epoch).collect();
            let mut seen = vec![0u32; epoch];
            for (u, global) in order.chunks(batch).enumerate() {
                for rank in 0..world {
                    let mine = &global[shard(global.len(), world, rank)];
                    assert_eq!(mine.len(), micro * accum, "equal shares");
                    for (j, mb) in mine.chunks(micro).enumerate() {
                        let single = &global[(rank * accum + j) * micro..][..micro];
                        assert_eq!(mb, single, "update {u} rank {rank} micro {j}");
                        mb.iter().for_each(|&s| seen[s] += 1);
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{batch}/{world}/{accum}");
        }
    }

    #[test]
    fn batch_size_rule() {
        assert_eq!(micro_batch(512, 8, 1).unwrap(), 64);
        assert_eq!(micro_batch(512, 8, 2).unwrap(), 32);
        assert!(check_batch(512, 8, 32, 2).is_ok());
        for (b, w, a) in [
            (512, 3, 1),
            (100, 8, 1),
            (4, 8, 1),
            (0, 1, 1),
            (8, 0, 1),
            (8, 1, 0),
        ] {
            let e = micro_batch(b, w, a).unwrap_err();
            assert!(
                matches!(e, DistError::BatchSplit { batch_size, world, accum, .. }
                    if (batch_size, world, accum) == (b, w, a)),
                "{e:?}"
            );
            assert!(e.to_string().contains(&b.to_string()), "{e}");
        }
        // The message proposes sizes that fit.
        let e = micro_batch(100, 8, 1).unwrap_err().to_string();
        assert!(e.contains("96 or 104"), "{e}");
        let e = micro_batch(4, 8, 1).unwrap_err().to_string();
        assert!(e.contains("batch size of 8"), "{e}");
        let e = check_batch(512, 8, 16, 2).unwrap_err().to_string();
        assert!(
            e.contains("micro-batch is 16") && e.contains("is 32"),
            "{e}"
        );
    }
}
