//! Throughput of the kernels at the engine's shapes (cpu-small ViT: N = 8320 token rows,
//! d = 192, MLP 768; ViT-B/16 eval: 1576 rows, d = 768).
//!
//! ```text
//! RAYON_NUM_THREADS=2 nice cargo run --release -p rdrop-kernels --example kernels_bench [reps]
//! ```
//! Prints, per kernel, the best and the median of `reps` timed runs (after one warm-up).
//! `gemm-rayon` is one `gemm` call with `Parallelism::Rayon`, which is how candle's CPU matmul
//! calls the same crate: it stands in for candle's matmul on these shapes.
use std::time::Instant;

use rdrop_kernels::linear::Split;
use rdrop_kernels::{gelu, layernorm, linear};

fn fill(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0
                - 0.5
        })
        .collect()
}

/// Best and median seconds of `reps` runs of `f` after a warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    (t[0], t[t.len() / 2])
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    println!(
        "threads {}, reps {reps} (best / median)",
        rayon::current_num_threads()
    );
    // (label, m, k, n, trans_a, trans_b)
    let n_rows = 8320;
    let mut shapes = Vec::new();
    for &(d_in, d_out) in &[(192, 576), (192, 768), (768, 192), (192, 192)] {
        shapes.push((
            format!("fwd  x·Wᵀ {d_in}->{d_out}"),
            n_rows,
            d_in,
            d_out,
            false,
            true,
        ));
        shapes.push((
            format!("bwd  dy·W {d_in}<-{d_out}"),
            n_rows,
            d_out,
            d_in,
            false,
            false,
        ));
        shapes.push((
            format!("bwd dyᵀ·x {d_out}x{d_in}"),
            d_out,
            n_rows,
            d_in,
            true,
            false,
        ));
    }
    shapes.push(("vitb qkv 768->2304".into(), 1576, 768, 2304, false, true));
    shapes.push(("vitb fc1 768->3072".into(), 1576, 768, 3072, false, true));
    shapes.push(("vitb fc2 3072->768".into(), 1576, 3072, 768, false, true));
    for (label, m, k, n, ta, tb) in shapes {
        let a = fill(m * k, 1);
        let b = fill(k * n, 2);
        let mut c = vec![0f32; m * n];
        let flop = 2.0 * (m * k * n) as f64;
        let mut line = format!("{label:24} {m:5}x{k:5}x{n:5}");
        for split in [Split::Blocks, Split::GemmRayon, Split::Auto] {
            let (best, med) = time(reps, || {
                linear::matmul_with(split, &mut c, &a, &b, m, k, n, ta, tb, 1.0, 0.0, |_, _| {})
            });
            line += &format!(
                "  {split:?} {:5.1}/{:5.1}",
                flop / best / 1e9,
                flop / med / 1e9
            );
        }
        println!("{line}");
    }

    // Fused linear + GELU against linear then GELU, fc1 of cpu-small.
    let (rows, d_in, d_out) = (n_rows, 192, 768);
    let x = fill(rows * d_in, 3);
    let w = fill(d_out * d_in, 4);
    let bias = fill(d_out, 5);
    let mut pre = vec![0f32; rows * d_out];
    let mut y = vec![0f32; rows * d_out];
    let (b1, m1) = time(reps, || {
        linear::linear_gelu_fwd(&mut pre, &mut y, &x, &w, &bias, rows, d_in, d_out)
    });
    let (b2, m2) = time(reps, || {
        linear::linear_fwd(&mut pre, &x, &w, Some(&bias), rows, d_in, d_out);
        gelu::gelu_fwd(&mut y, &pre);
    });
    println!(
        "fc1 8320x192->768: linear_gelu_fwd {:.2} / {:.2} ms, linear_fwd+gelu_fwd {:.2} / {:.2} ms",
        b1 * 1e3,
        m1 * 1e3,
        b2 * 1e3,
        m2 * 1e3
    );
    let (b3, m3) = time(reps, || {
        linear::linear_fwd(&mut pre, &x, &w, Some(&bias), rows, d_in, d_out)
    });
    println!("   linear_fwd alone {:.2} / {:.2} ms", b3 * 1e3, m3 * 1e3);
    let el = (rows * d_out) as f64;
    let (b, m) = time(reps, || gelu::gelu_fwd(&mut y, &pre));
    println!(
        "gelu_fwd  {:.0} / {:.0} Melem/s",
        el / b / 1e6,
        el / m / 1e6
    );
    let dy = fill(rows * d_out, 6);
    let (b, m) = time(reps, || gelu::gelu_bwd(&mut y, &dy, &pre));
    println!(
        "gelu_bwd  {:.0} / {:.0} Melem/s",
        el / b / 1e6,
        el / m / 1e6
    );
    let mut dx = vec![0f32; rows * d_in];
    let mut dw = vec![0f32; d_out * d_in];
    let mut db = vec![0f32; d_out];
    let (b, m) = time(reps, || {
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
    let flop = 4.0 * (rows * d_in * d_out) as f64;
    println!(
        "linear_bwd fc1 (dx, dW, db) {:.2} / {:.2} ms = {:.1} GFLOP/s best",
        b * 1e3,
        m * 1e3,
        flop / b / 1e9
    );
    let (b, m) = time(reps, || {
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
    println!(
        "linear_bwd fc1 without db {:.2} / {:.2} ms",
        b * 1e3,
        m * 1e3
    );

    // LayerNorm, cpu-small and ViT-B.
    for &(rows, d) in &[(n_rows, 192), (1576, 768)] {
        let x = fill(rows * d, 7);
        let g = fill(d, 8);
        let be = fill(d, 9);
        let dy = fill(rows * d, 10);
        let mut y = vec![0f32; rows * d];
        let (mut mu, mut rs) = (vec![0f32; rows], vec![0f32; rows]);
        let (b, m) = time(reps, || {
            layernorm::layernorm_fwd(&mut y, &mut mu, &mut rs, &x, &g, &be, 1e-6, d)
        });
        let bytes = (2 * rows * d * 4) as f64;
        println!(
            "layernorm_fwd {rows}x{d}: {:.2} / {:.2} ms, {:.1} GB/s best",
            b * 1e3,
            m * 1e3,
            bytes / b / 1e9
        );
        let mut dx = vec![0f32; rows * d];
        let (mut dg, mut dbe) = (vec![0f32; d], vec![0f32; d]);
        let mut s = vec![0f32; layernorm::layernorm_bwd_scratch_len(rows, d)];
        let (b, m) = time(reps, || {
            layernorm::layernorm_bwd(&mut dx, &mut dg, &mut dbe, &mut s, &dy, &x, &mu, &rs, &g, d)
        });
        let bytes = (4 * rows * d * 4) as f64;
        println!(
            "layernorm_bwd {rows}x{d}: {:.2} / {:.2} ms, {:.1} GB/s best",
            b * 1e3,
            m * 1e3,
            bytes / b / 1e9
        );
    }
}
