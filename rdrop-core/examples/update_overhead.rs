//! Time of the non-model part of an update (unscale, clip, optimiser step) on ViT-B/16-shaped
//! parameters (86M), on the CPU or (with `--features cuda`, argument `cuda`) the first GPU.
//!
//! `cargo run --release -p rdrop-core --example update_overhead [cpu|cuda] [sgd|adamw]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rdrop_core::{clip_grad_norm, OptimConfig, Optimizer, OptimizerKind};

fn vit_b_shapes() -> Vec<Vec<usize>> {
    let d = 768;
    let mut s = vec![
        vec![1, 1, d],
        vec![1, 577, d],
        vec![d, 3 * 16 * 16],
        vec![d],
    ];
    for _ in 0..12 {
        for shape in [
            vec![d],
            vec![d],
            vec![d, d],
            vec![d],
            vec![d, d],
            vec![d],
            vec![d, d],
            vec![d],
            vec![d, d],
            vec![d],
            vec![d],
            vec![d],
            vec![4 * d, d],
            vec![4 * d],
            vec![d, 4 * d],
            vec![d],
        ] {
            s.push(shape);
        }
    }
    s.extend([vec![d], vec![d], vec![100, d], vec![100]]);
    s
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = match args.get(1).map(String::as_str) {
        Some("cuda") => Device::new_cuda(0)?,
        _ => Device::Cpu,
    };
    let kind = match args.get(2).map(String::as_str) {
        Some("adamw") => OptimizerKind::AdamW,
        _ => OptimizerKind::Sgd,
    };
    let shapes = vit_b_shapes();
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let vars: Vec<(String, Var)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((format!("p{i}"), Var::zeros(s.as_slice(), DType::F32, &dev)?)))
        .collect::<candle_core::Result<_>>()?;
    let grads: Vec<Option<Tensor>> = shapes
        .iter()
        .map(|s| Tensor::ones(s.as_slice(), DType::F32, &dev).map(Some))
        .collect::<candle_core::Result<_>>()?;
    let mut opt = Optimizer::new(
        OptimConfig {
            kind,
            ..Default::default()
        },
        vars,
    )?;
    let reps = 5;
    let mut times = vec![];
    for _ in 0..=reps {
        let t = Instant::now();
        let mut g: Vec<Option<Tensor>> = grads
            .iter()
            .map(|g| g.as_ref().map(|g| g.affine(1.0 / 1024.0, 0.0)).transpose())
            .collect::<candle_core::Result<_>>()?;
        let norm = clip_grad_norm(&mut g, 1.0)?;
        let _ = norm.map(|n| n.to_scalar::<f32>()).transpose()?;
        opt.step(&g, 1e-2)?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0); // warm-up (first step allocates the moments)
    times.sort_by(f64::total_cmp);
    println!(
        "{} tensors, {:.1}M parameters, {kind:?} on {dev:?}: unscale+clip+sync+step median {:.1} ms (min {:.1})",
        shapes.len(),
        n as f64 / 1e6,
        1e3 * times[times.len() / 2],
        1e3 * times[0]
    );
    Ok(())
}
