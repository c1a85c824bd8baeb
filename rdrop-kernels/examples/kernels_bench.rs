//! Throughput of the kernels at the engine's shapes (cpu-small ViT: N = 8320 token rows,
//! d = 192, MLP 768; ViT-B/16 eval: 1576 rows, d = 768).
//!
//! ```text
//! RAYON_NUM_THREADS=2 nice cargo run --release -p rdrop-kernels --example kernels_bench [reps]
//! ```
//! Per kernel: the rate from the best and from the median of `reps` timed runs (after one
//! warm-up), and the rate per CPU-second (process CPU time from /proc/self/stat, all threads):
//! on a shared machine the wall-clock rates fall with the load, the per-CPU-second one much
//! less (×threads estimates an idle machine's rate when the threads scale).
//! `GemmRayon` is one `gemm` call with `Parallelism::Rayon`, which is how candle's CPU matmul
//! calls the same crate: it stands in for candle's matmul on these shapes.
use std::time::Instant;

use rdrop_kernels::linear::Split;
use rdrop_kernels::{dropout, gelu, layernorm, linear};

fn fill(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0
                - 0.5
        })
        .collect()
}

/// This process's user + system CPU seconds (all threads), or 0 where /proc is missing.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name start at field 3 (state); utime and stime
    // are fields 14 and 15, in clock ticks (100 a second on Linux).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Rates for `work` units per run: (best wall, median wall, per CPU-second).
fn rate(reps: usize, work: f64, mut f: impl FnMut()) -> (f64, f64, f64) {
    f();
    let c0 = cpu_seconds();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    let cpu = (cpu_seconds() - c0) / reps as f64;
    t.sort_by(|a, b| a.total_cmp(b));
    (work / t[0], work / t[t.len() / 2], work / cpu)
}

fn show(r: (f64, f64, f64)) -> String {
    format!("{:6.1} {:6.1} {:6.1}", r.0, r.1, r.2)
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    println!(
        "threads {}, reps {reps}; each figure: best, median, per CPU-second",
        rayon::current_num_threads()
    );
    println!("GEMM GFLOP/s");
    let n_rows = 8320;
    let mut shapes = Vec::new();
    for &(d_in, d_out) in &[(192, 576), (192, 768), (768, 192), (192, 192)] {
        shapes.push((
            format!("x·Wᵀ {d_in}->{d_out}"),
            n_rows,
            d_in,
            d_out,
            false,
            true,
        ));
        shapes.push((
            format!("dy·W {d_in}<-{d_out}"),
            n_rows,
            d_out,
            d_in,
            false,
            false,
        ));
        shapes.push((
            format!("dyᵀ·x {d_out}x{d_in}"),
            d_out,
            n_rows,
            d_in,
            true,
            false,
        ));
    }
    shapes.push(("ViT-B qkv".into(), 1576, 768, 2304, false, true));
    shapes.push(("ViT-B fc1".into(), 1576, 768, 3072, false, true));
    shapes.push(("ViT-B fc2".into(), 1576, 3072, 768, false, true));
    for (label, m, k, n, ta, tb) in shapes {
        let a = fill(m * k, 1);
        let b = fill(k * n, 2);
        let mut c = vec![0f32; m * n];
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        let mut line = format!("{label:16} {m:4}x{k:4}x{n:4}");
        for split in [Split::Blocks, Split::GemmRayon, Split::Auto] {
            let r = rate(reps, gflop, || {
                linear::matmul_with(split, &mut c, &a, &b, m, k, n, ta, tb, 1.0, 0.0, |_, _| {})
            });
            line += &format!(" | {split:?} {}", show(r));
        }
        println!("{line}");
    }

    // fc1 of cpu-small: fused linear + GELU against linear then GELU; the backward.
    let (rows, d_in, d_out) = (n_rows, 192, 768);
    let x = fill(rows * d_in, 3);
    let w = fill(d_out * d_in, 4);
    let bias = fill(d_out, 5);
    let mut pre = vec![0f32; rows * d_out];
    let mut y = vec![0f32; rows * d_out];
    let per_s = 1.0; // runs per second
    let r = rate(reps, per_s, || {
        linear::linear_gelu_fwd(&mut pre, &mut y, &x, &w, &bias, rows, d_in, d_out)
    });
    println!(
        "fc1 {rows}x{d_in}->{d_out} runs/s: linear_gelu_fwd {}",
        show(r)
    );
    let r = rate(reps, per_s, || {
        linear::linear_fwd(&mut pre, &x, &w, Some(&bias), rows, d_in, d_out);
        gelu::gelu_fwd(&mut y, &pre);
    });
    println!("                     linear_fwd + gelu_fwd {}", show(r));
    let r = rate(reps, per_s, || {
        linear::linear_fwd(&mut pre, &x, &w, Some(&bias), rows, d_in, d_out)
    });
    println!("                     linear_fwd {}", show(r));
    let dy = fill(rows * d_out, 6);
    let (mut dx, mut dw, mut db) = (
        vec![0f32; rows * d_in],
        vec![0f32; d_out * d_in],
        vec![0f32; d_out],
    );
    let r = rate(reps, per_s, || {
        linear::linear_bwd(
            Some(&mut dx),
            false,
            &mut dw,
            Some(&mut db),
            &dy,
            &x,
            &w,
            rows,
            d_in,
            d_out,
        )
    });
    println!("                     linear_bwd (dx, dW, db) {}", show(r));
    let r = rate(reps, per_s, || {
        linear::linear_bwd(
            Some(&mut dx),
            false,
            &mut dw,
            None,
            &dy,
            &x,
            &w,
            rows,
            d_in,
            d_out,
        )
    });
    println!("                     linear_bwd (dx, dW) {}", show(r));
    let mel = (rows * d_out) as f64 / 1e6;
    let r = rate(reps, mel, || gelu::gelu_fwd(&mut y, &pre));
    println!("gelu_fwd Melem/s {}", show(r));
    let r = rate(reps, mel, || gelu::gelu_bwd(&mut y, &dy, &pre));
    println!("gelu_bwd Melem/s {}", show(r));

    // Residual dropout add at fc2's output size and at fc1's (the largest dropout site).
    let rows_keys: Vec<dropout::RowKey> = (0..n_rows as u32)
        .map(|i| dropout::RowKey {
            sample: i / 65,
            pass: i % 2,
        })
        .collect();
    let site = dropout::Site {
        seed: 1,
        update: 2,
        site: 3,
        p: 0.1,
    };
    for n in [192, 768] {
        let yv = fill(n_rows * n, 11);
        let mut res = fill(n_rows * n, 12);
        let mel = (n_rows * n) as f64 / 1e6;
        let r = rate(reps, mel, || {
            dropout::residual_dropout_add(&mut res, &yv, n, &site, &rows_keys)
        });
        println!("residual_dropout_add {n_rows}x{n} Melem/s {}", show(r));
        let r = rate(reps, mel, || {
            dropout::dropout_apply(&mut res, n, &site, &rows_keys)
        });
        println!("dropout_apply        {n_rows}x{n} Melem/s {}", show(r));
    }

    // LayerNorm, cpu-small and ViT-B: GB/s counting x and y (fwd), x, dy, dx read+write (bwd).
    for &(rows, d) in &[(n_rows, 192), (1576, 768)] {
        let x = fill(rows * d, 7);
        let g = fill(d, 8);
        let be = fill(d, 9);
        let dy = fill(rows * d, 10);
        let mut y = vec![0f32; rows * d];
        let (mut mu, mut rs) = (vec![0f32; rows], vec![0f32; rows]);
        let gb = (rows * d * 4) as f64 / 1e9;
        let r = rate(reps, 2.0 * gb, || {
            layernorm::layernorm_fwd(&mut y, &mut mu, &mut rs, &x, &g, &be, 1e-6, d)
        });
        println!("layernorm_fwd {rows}x{d} GB/s {}", show(r));
        let mut dx = vec![0f32; rows * d];
        let (mut dg, mut dbe) = (vec![0f32; d], vec![0f32; d]);
        let mut s = vec![0f32; layernorm::layernorm_bwd_scratch_len(rows, d)];
        let r = rate(reps, 4.0 * gb, || {
            layernorm::layernorm_bwd(&mut dx, &mut dg, &mut dbe, &mut s, &dy, &x, &mu, &rs, &g, d)
        });
        println!("layernorm_bwd {rows}x{d} GB/s {}", show(r));
    }
}
