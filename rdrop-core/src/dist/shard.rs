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
