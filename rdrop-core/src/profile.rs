//! Where one update's time goes: time per op group with the group's floating-point operations
//! and memory traffic, from which its achieved FLOP/s and bytes/s follow.
//!
//! The engines report their ops as *laps* ([`Stopwatch::lap`] on the CPU, events on a GPU): a
//! lap ends the previous one, so the groups of a pass add up to the pass — nothing between
//! two ops goes uncounted. A group is named by its op and, for the backward, a `_bwd` suffix
//! (`qkv_gemm`, `qkv_gemm_bwd`); the same name from several layers is one group.

use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The op groups, in the order a profile lists them (forward, then backward, then update).
pub const GROUPS: &[&str] = &[
    "patch_embed",
    "layernorm",
    "qkv_gemm",
    "attention",
    "proj_gemm",
    "mlp_gemm",
    "gelu_dropout",
    "residual",
    "head",
    "loss",
    "head_bwd",
    "residual_bwd",
    "mlp_gemm_bwd",
    "gelu_dropout_bwd",
    "layernorm_bwd",
    "proj_gemm_bwd",
    "attention_bwd",
    "qkv_gemm_bwd",
    "patch_embed_bwd",
    "grad_reduce",
    "optimizer",
];

/// One group's totals over an update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupTime {
    /// The group's name (one of [`GROUPS`]).
    pub group: String,
    /// Milliseconds.
    pub ms: f64,
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: f64,
    /// Bytes read and written, counting each operand once per op.
    pub bytes: f64,
}

impl GroupTime {
    /// Achieved TFLOP/s (0 for a group without arithmetic or time).
    pub fn tflops(&self) -> f64 {
        if self.ms > 0.0 {
            self.flops / (self.ms * 1e9)
        } else {
            0.0
        }
    }

    /// Achieved GB/s (0 without time).
    pub fn gbps(&self) -> f64 {
        if self.ms > 0.0 {
            self.bytes / (self.ms * 1e6)
        } else {
            0.0
        }
    }
}

/// An update's profile: its groups in [`GROUPS`] order (names outside it last).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The groups that ran.
    pub groups: Vec<GroupTime>,
}

impl Profile {
    /// Adds `ms`, `flops` and `bytes` to `group`.
    pub fn add(&mut self, group: &str, ms: f64, flops: f64, bytes: f64) {
        match self.groups.iter_mut().find(|g| g.group == group) {
            Some(g) => {
                g.ms += ms;
                g.flops += flops;
                g.bytes += bytes;
            }
            None => {
                self.groups.push(GroupTime {
                    group: group.to_string(),
                    ms,
                    flops,
                    bytes,
                });
                let rank = |n: &str| GROUPS.iter().position(|g| *g == n).unwrap_or(GROUPS.len());
                self.groups.sort_by_key(|g| rank(&g.group));
            }
        }
    }

    /// Adds every group of `other`.
    pub fn merge(&mut self, other: &Profile) {
        for g in &other.groups {
            self.add(&g.group, g.ms, g.flops, g.bytes);
        }
    }

    /// Every value divided by `n` (the mean of `n` summed updates).
    pub fn scaled(&self, n: f64) -> Profile {
        Profile {
            groups: self
                .groups
                .iter()
                .map(|g| GroupTime {
                    group: g.group.clone(),
                    ms: g.ms / n,
                    flops: g.flops / n,
                    bytes: g.bytes / n,
                })
                .collect(),
        }
    }

    /// Milliseconds over all groups.
    pub fn total_ms(&self) -> f64 {
        self.groups.iter().map(|g| g.ms).sum()
    }

    /// Floating-point operations over all groups.
    pub fn total_flops(&self) -> f64 {
        self.groups.iter().map(|g| g.flops).sum()
    }
}

/// CPU laps: each [`Stopwatch::lap`] charges the time since the previous lap (or
/// [`Stopwatch::start`]) to a group. Off, a lap costs one branch.
#[derive(Debug, Default)]
pub struct Stopwatch {
    on: bool,
    last: Option<Instant>,
    profile: Profile,
}

impl Stopwatch {
    /// A stopwatch that records (`on`) or ignores laps.
    pub fn new(on: bool) -> Self {
        Self {
            on,
            ..Self::default()
        }
    }

    /// Whether laps are recorded.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Turns recording on or off (off drops what was recorded).
    pub fn set_on(&mut self, on: bool) {
        self.on = on;
        self.last = None;
        self.profile = Profile::default();
    }

    /// Starts the first lap now.
    pub fn start(&mut self) {
        if self.on {
            self.last = Some(Instant::now());
        }
    }

    /// Ends the current lap, charging it with `flops` and `bytes` to `group`, and starts the
    /// next.
    pub fn lap(&mut self, group: &str, flops: f64, bytes: f64) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        let ms = self.last.map_or(0.0, |t| (now - t).as_secs_f64() * 1e3);
        self.profile.add(group, ms, flops, bytes);
        self.last = Some(now);
    }

    /// What was recorded since the last take (empty when off).
    pub fn take(&mut self) -> Profile {
        self.last = None;
        std::mem::take(&mut self.profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_merge_by_name_in_the_listed_order() {
        let mut p = Profile::default();
        p.add("optimizer", 1.0, 10.0, 100.0);
        p.add("qkv_gemm", 2.0, 20.0, 200.0);
        p.add("qkv_gemm", 3.0, 30.0, 300.0);
        p.add("custom", 0.5, 0.0, 0.0);
        let names: Vec<_> = p.groups.iter().map(|g| g.group.as_str()).collect();
        assert_eq!(names, ["qkv_gemm", "optimizer", "custom"]);
        assert_eq!(p.groups[0].ms, 5.0);
        assert_eq!(p.groups[0].flops, 50.0);
        assert_eq!(p.total_ms(), 6.5);
        assert!((p.groups[0].tflops() - 50.0 / 5e9).abs() < 1e-18);
        assert!((p.scaled(2.0).groups[0].bytes - 250.0).abs() < 1e-12);
    }

    #[test]
    fn laps_cover_the_time_between_them_and_nothing_when_off() {
        let mut off = Stopwatch::new(false);
        off.start();
        off.lap("loss", 1.0, 1.0);
        assert!(off.take().groups.is_empty());

        let mut sw = Stopwatch::new(true);
        let t0 = Instant::now();
        sw.start();
        std::thread::sleep(std::time::Duration::from_millis(20));
        sw.lap("attention", 7.0, 8.0);
        std::thread::sleep(std::time::Duration::from_millis(10));
        sw.lap("loss", 0.0, 0.0);
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        let p = sw.take();
        assert_eq!(p.groups.len(), 2);
        assert!(p.groups[0].ms >= 20.0 && p.groups[1].ms >= 10.0);
        assert!(p.total_ms() <= wall, "{} > {wall}", p.total_ms());
        assert!(sw.take().groups.is_empty(), "take empties it");
    }
}
