//! Timings of the attention, loss and optimiser kernels at the `cpu-small` ViT's sizes
//! (B = 128 rows, T = 65, 3 heads of 64; 100 classes; ~2.7 M parameters) and ViT-B/16's
//! attention (T = 197, 12 heads of 64).
//!
//! Times are CPU time summed over threads (robust to a shared machine), so with 2 threads the
//! wall time is about half when both threads are busy.
//!
//! Run: `cargo run --release -p rdrop-kernels --example bench_kernels [threads]`

use std::time::Instant;

use rdrop_kernels::attention::{attention_bwd, attention_bwd_scratch_len, attention_fwd, AttnDims};
use rdrop_kernels::dropout::{RowKey, Site};
use rdrop_kernels::loss::{rdrop_loss, LossConfig, LossMode};
use rdrop_kernels::optim::{adamw_step, sgd_step, sum_squares, AdamWHyper, SgdHyper};

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let w = rdrop_kernels::philox::philox4x32_10([i as u32, seed, 0, 0], [1, 2])[0];
            (w as f64 / 4_294_967_296.0 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// CPU time of all the process's threads so far (ns, from /proc; 0 where unavailable): on a
/// shared machine it approximates the wall time the work would take unloaded.
fn cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Median of `reps` CPU-time measurements of `f`, in milliseconds (see [`cpu_ns`]).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let (s, c) = (Instant::now(), cpu_ns());
            f();
            let cpu = cpu_ns().saturating_sub(c) as f64 / 1e6;
            if cpu > 0.0 {
                cpu
            } else {
                s.elapsed().as_secs_f64() * 1e3
            }
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[reps / 2]
}

fn attention(name: &str, dims: AttnDims, reps: usize) {
    let (b, t, d) = (dims.batch, dims.tokens, dims.width());
    let qkv = data(b * t * 3 * d, 1);
    let dout = data(b * t * d, 2);
    let mut out = vec![0f32; b * t * d];
    let mut probs = vec![0f32; b * dims.heads * t * t];
    let mut dqkv = vec![0f32; qkv.len()];
    let mut scratch = vec![0f32; attention_bwd_scratch_len(dims)];
    let rows: Vec<RowKey> = (0..b as u32)
        .map(|i| RowKey {
            sample: i / 2,
            pass: i % 2,
        })
        .collect();
    let site = Site {
        seed: 1,
        update: 1,
        site: 3,
        p: 0.1,
    };
    let flops = (b * dims.heads * t * t * dims.head_dim * 4) as f64;
    for drop in [None, Some((&site, rows.as_slice()))] {
        let f = time(reps, || {
            attention_fwd(&mut out, &mut probs, &qkv, dims, drop)
        });
        let g = time(reps, || {
            attention_bwd(&mut dqkv, &mut scratch, &dout, &qkv, &probs, dims, drop)
        });
        println!(
            "attention {name} dropout {:5}: fwd {f:8.2} ms ({:5.1} GFLOP/s)  bwd {g:8.2} ms ({:5.1} GFLOP/s)",
            drop.is_some(),
            flops / f / 1e6,
            2.0 * flops / g / 1e6
        );
    }
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    println!("threads {threads}");
    attention(
        "cpu-small B128 T65 H3",
        AttnDims {
            batch: 128,
            tokens: 65,
            heads: 3,
            head_dim: 64,
        },
        11,
    );
    attention(
        "vit-b16 B16 T197 H12",
        AttnDims {
            batch: 16,
            tokens: 197,
            heads: 12,
            head_dim: 64,
        },
        5,
    );

    let (m, c) = (64, 100);
    let (p, q) = (data(m * c, 3), data(m * c, 4));
    let labels: Vec<u32> = (0..m as u32).map(|i| i * 7 % c as u32).collect();
    let (mut dp, mut dq) = (vec![0f32; m * c], vec![0f32; m * c]);
    let cfg = LossConfig {
        alpha: 0.3,
        mode: LossMode::Mean,
        label_smoothing: 0.1,
    };
    let l = time(51, || {
        rdrop_loss(&mut dp, &mut dq, &p, &q, &labels, c, &cfg, 1.0).ok();
    });
    println!("rdrop_loss 64x100: {:8.3} ms", l);

    let n = 2_700_000;
    let g = data(n, 5);
    let mut w = data(n, 6);
    let (mut m1, mut m2) = (vec![0f32; n], vec![0f32; n]);
    let s = time(21, || {
        std::hint::black_box(sum_squares(&g));
    });
    let sh = SgdHyper {
        lr: 1e-3,
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    };
    let sg = time(21, || sgd_step(&mut w, &g, &mut m1, false, 0.5, &sh));
    let ah = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    };
    let mut step = 0;
    let ad = time(21, || {
        step += 1;
        adamw_step(&mut w, &g, &mut m1, &mut m2, step, 0.5, &ah)
    });
    println!("{n} params: sum_squares {s:6.3} ms  sgd {sg:6.3} ms  adamw {ad:6.3} ms");
}
