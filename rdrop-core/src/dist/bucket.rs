//! Gradient buckets: which ranges of the flat gradient buffer are summed over the ranks, and
//! when, so that the all-reduce overlaps the backward.
//!
//! The backward of a ViT finishes the buffer from its end: the classifier and the final
//! LayerNorm first, then block `L-1`, …, block 0, then the embeddings. A model reports the
//! offsets at which everything above is final, in the order it reaches them (its *ready
//! cuts*, strictly descending, the last one 0). A bucket is a run of whole pieces between
//! two chosen cuts, closed as soon as it holds at least `cap` elements (the last one at 0
//! whatever its size):
//! ```text
//! ready  = [r_0 > r_1 > … > r_k = 0]               (from the model's layout)
//! cuts   = the r_i where (previous cut − r_i) ≥ cap, and r_k     (previous cut starts at len)
//! bucket_i = [cuts_i, cuts_{i−1})                  (cuts_{−1} = len)
//! ```
//! During the last micro-batch of an update, each bucket is handed to the collective as soon
//! as the backward has written its last gradient, while the backward goes on below it. Every
//! element is summed exactly once, by the same rank-order sum as one all-reduce of the whole
//! buffer (TCP and the in-process collective: bit-identical to it; NCCL: up to its order).

use std::ops::Range;

/// The bucket cuts for a buffer of `len` elements, from the model's `ready` cuts (see the
/// module docs) and a minimum bucket size of `cap` elements (`0`: one bucket per ready cut).
/// Offsets that are not strictly descending or not below `len` are skipped, and 0 always ends
/// the list, so the buckets always tile `[0, len)` exactly once.
pub fn bucket_cuts(ready: &[usize], len: usize, cap: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut prev = len;
    let mut last_ready = len;
    for &r in ready {
        if r >= last_ready || r == 0 {
            continue;
        }
        last_ready = r;
        if prev - r >= cap.max(1) {
            out.push(r);
            prev = r;
        }
    }
    out.push(0);
    out
}

/// The bucket cuts at `mb` MiB ([`bucket_cuts`] with [`cap_elements`]); `None` when `mb` is
/// not a positive number: one all-reduce after the backward, no buckets.
pub fn cuts_for(mb: f64, ready: &[usize], len: usize) -> Option<Vec<usize>> {
    match cap_elements(mb) {
        0 => None,
        cap => Some(bucket_cuts(ready, len, cap)),
    }
}

/// The buckets `[cuts_i, cuts_{i−1})` in the order they are reduced (see [`bucket_cuts`]).
pub fn buckets(cuts: &[usize], len: usize) -> Vec<Range<usize>> {
    let mut prev = len;
    cuts.iter()
        .map(|&c| {
            let r = c..prev;
            prev = c;
            r
        })
        .collect()
}

/// Elements in `mb` MiB of `f32` gradients (`0` when `mb` is 0 or not a positive number).
pub fn cap_elements(mb: f64) -> usize {
    if mb.is_finite() && mb > 0.0 {
        ((mb * 1024.0 * 1024.0 / 4.0).ceil() as usize).max(1)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(cuts: &[usize], len: usize) -> Vec<usize> {
        let mut seen = vec![0usize; len];
        for r in buckets(cuts, len) {
            for i in r {
                seen[i] += 1;
            }
        }
        seen
    }

    #[test]
    fn buckets_close_at_ready_cuts_once_full_and_tile_the_buffer() {
        // A "model" of 100 elements: head [90, 100), blocks [60, 90), [30, 60), embeddings [0, 30).
        let ready = [90, 60, 30, 0];
        assert_eq!(bucket_cuts(&ready, 100, 0), vec![90, 60, 30, 0]);
        assert_eq!(bucket_cuts(&ready, 100, 10), vec![90, 60, 30, 0]);
        // The head (10) is too small alone: it joins the last block.
        assert_eq!(bucket_cuts(&ready, 100, 11), vec![60, 30, 0]);
        assert_eq!(bucket_cuts(&ready, 100, 40), vec![60, 0]);
        // Larger than the buffer: one bucket, reduced after the backward.
        assert_eq!(bucket_cuts(&ready, 100, 1000), vec![0]);
        for cap in [0, 1, 10, 11, 40, 70, 1000] {
            let cuts = bucket_cuts(&ready, 100, cap);
            assert!(covered(&cuts, 100).iter().all(|&n| n == 1), "cap {cap}");
            assert!(cuts.windows(2).all(|w| w[0] > w[1]));
        }
        assert_eq!(buckets(&[60, 0], 100), vec![60..100, 0..60]);
    }

    #[test]
    fn bad_ready_lists_still_tile_the_buffer() {
        for ready in [
            vec![],
            vec![120, 50, 0],
            vec![50, 70, 20],
            vec![50, 50, 0],
            vec![0, 0],
        ] {
            let cuts = bucket_cuts(&ready, 100, 0);
            assert_eq!(cuts.last(), Some(&0), "{ready:?}");
            assert!(
                covered(&cuts, 100).iter().all(|&n| n == 1),
                "{ready:?} → {cuts:?}"
            );
        }
        assert_eq!(bucket_cuts(&[], 0, 4), vec![0]);
    }

    #[test]
    fn megabytes_to_elements() {
        assert_eq!(cap_elements(0.0), 0);
        assert_eq!(cap_elements(-1.0), 0);
        assert_eq!(cap_elements(f64::NAN), 0);
        assert_eq!(cap_elements(1.0), 262_144);
        assert_eq!(cap_elements(25.0), 6_553_600);
        assert_eq!(cap_elements(1e-9), 1);
        assert_eq!(cuts_for(0.0, &[60, 0], 100), None);
        assert_eq!(cuts_for(1e-9, &[60, 0], 100), Some(vec![60, 0]));
        assert_eq!(cuts_for(25.0, &[60, 0], 100), Some(vec![0]));
    }
}
