//! Times R-Drop updates of the explicit engine against the candle-autograd trainer on
//! synthetic data (profiling aid; `rdrop bench train` is the user-facing benchmark):
//! `cargo run --release -p rdrop-vit --example engine_step -- [preset] [micro-batch] [steps] [explicit|autograd]`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::{DropoutRng, FlatTrainer, TrainConfig, Trainer};
use rdrop_vit::{Engine, ViTConfig, VisionTransformer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("cpu-small", |s| s.as_str());
    let m: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let steps: usize = args.get(3).map_or(Ok(10), |s| s.parse())?;
    let which = args.get(4).map_or("explicit", |s| s.as_str());
    let cfg = ViTConfig::preset(preset)?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = VisionTransformer::new(&cfg, vb, DropoutRng::new(1))?;
    let s = cfg.image_size;
    let x = Tensor::randn(0f32, 1.0, (m, 3, s, s), &Device::Cpu)?;
    let y = Tensor::from_vec(
        (0..m)
            .map(|i| (i * 7 % cfg.num_classes) as u32)
            .collect::<Vec<_>>(),
        m,
        &Device::Cpu,
    )?;
    let batch = [(x, y)];
    let tcfg = TrainConfig {
        accum_steps: 1,
        micro_batch: m,
        ..TrainConfig::default()
    };
    let (mut f, mut b, mut o) = (0.0, 0.0, 0.0);
    let t0;
    if which == "explicit" {
        let mut e = Engine::from_model(&model)?;
        let mut t = FlatTrainer::new(tcfg, &e)?;
        for _ in 0..2 {
            t.update(&mut e, &batch)?;
        }
        t0 = Instant::now();
        for _ in 0..steps {
            let st = t.update(&mut e, &batch)?;
            (f, b, o) = (f + st.forward_s, b + st.backward_s, o + st.optimizer_s);
        }
        eprintln!("plan {:.0} MiB", e.plan_bytes() as f64 / (1 << 20) as f64);
    } else {
        let mut t = Trainer::new(tcfg, model.named_vars())?;
        for _ in 0..2 {
            t.update(&model, &batch)?;
        }
        t0 = Instant::now();
        for _ in 0..steps {
            let st = t.update(&model, &batch)?;
            (f, b, o) = (f + st.forward_s, b + st.backward_s, o + st.optimizer_s);
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let n = steps as f64;
    let rss = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(|l| l.to_string())
        .unwrap_or_default();
    println!(
        "{which} {preset} m={m}: {:.1} samples/s, step {:.0} ms (fwd {:.0}, bwd {:.0}, opt {:.1}); {rss}",
        m as f64 * n / wall,
        1e3 * wall / n,
        1e3 * f / n,
        1e3 * b / n,
        1e3 * o / n
    );
    Ok(())
}
