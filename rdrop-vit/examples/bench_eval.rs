//! Eval-mode throughput of rdrop-vit on the CPU (random weights): the peer of
//! `scripts/bench_timm_eval.py`.
//!
//! `RAYON_NUM_THREADS=2 cargo run -p rdrop-vit --example bench_eval -- [preset] [image] [batch] [iters]`
//! (defaults: vit-b16 224 8 10). Prints one JSON line.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::DropoutRng;
use rdrop_vit::{ViTConfig, VisionTransformer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let preset = a.first().map_or("vit-b16", String::as_str);
    let image: usize = a.get(1).map_or(Ok(224), |s| s.parse())?;
    let batch: usize = a.get(2).map_or(Ok(8), |s| s.parse())?;
    let iters: usize = a.get(3).map_or(Ok(10), |s| s.parse())?;
    let cfg = ViTConfig {
        image_size: image,
        ..ViTConfig::preset(preset)?
    };
    let vm = VarMap::new();
    let m = VisionTransformer::new(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        DropoutRng::new(0),
    )?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, image, image), &Device::Cpu)?;
    for _ in 0..2 {
        m.forward_t(&x, false)?;
    }
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        m.forward_t(&x, false)?;
    }
    let dt = t0.elapsed().as_secs_f64() / iters as f64;
    println!(
        "{{\"impl\": \"rdrop-vit (candle 0.11.1)\", \"preset\": \"{preset}\", \"image_size\": {image}, \"batch\": {batch}, \"threads\": \"{}\", \"params\": {}, \"ms_per_batch\": {:.1}, \"images_per_s\": {:.2}}}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        cfg.num_params(),
        dt * 1e3,
        batch as f64 / dt
    );
    Ok(())
}
