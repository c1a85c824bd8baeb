//! `rdrop bench train`: R-Drop training-step throughput on synthetic data with a randomly
//! initialised model — the same step as `rdrop train` (the explicit engine or the autograd
//! model, `--engine`: two passes, loss, backward, clipping, SGD momentum), timed phase by phase.
//! `rdrop bench eval`: inference throughput of the same models.
//!
//! Comparable with `../shared/bench/torch_cpu_step.py THREADS cpu-small` (one forward of
//! [x; x], α 0.3, SGD momentum 0.9, clip 1.0, 3 warm-up steps): "samples/s" counts each
//! training sample once although it goes through the network twice; and with
//! `../shared/bench/torch_cpu_eval.py THREADS MODEL BATCH ITERS` (timm, eval mode, no grad).

use candle_core::{Device, Tensor};
use rdrop_core::{DecayKind, LossConfig, OptimConfig, ScheduleConfig, TrainConfig};
use rdrop_vit::ViTConfig;
use serde::Serialize;

use crate::config::Passes;
use crate::device::ComputeArgs;
use crate::learner::{Learner, Predictor};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Time R-Drop training updates of a randomly initialised ViT on synthetic data.
    Train(TrainArgs),
    /// Time eval-mode forwards (no dropout, no gradient) of a randomly initialised ViT.
    Eval(EvalArgs),
}

/// Arguments of `rdrop bench eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Architecture preset (vit-b16, cpu-small, ...).
    #[arg(long, default_value = "vit-b16")]
    pub model: String,
    /// Input side in pixels (default: the preset's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Images per forward.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Timed forwards (after one untimed).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Print one JSON object (its last line).
    #[arg(long)]
    pub json: bool,
}

/// What `rdrop bench eval --json` prints.
#[derive(Debug, Serialize)]
pub struct EvalBench {
    /// Images per second.
    pub images_per_s: f64,
    /// Peak memory in GiB (process peak RSS on CPU).
    pub peak_gib: Option<f64>,
    /// Model preset.
    pub model: String,
    /// Input side.
    pub image_size: usize,
    /// Images per forward.
    pub batch_size: usize,
    /// Timed forwards.
    pub iters: usize,
    /// `explicit` or `autograd`.
    pub engine: String,
    /// Device.
    pub device: String,
    /// CPU threads.
    pub threads: usize,
}

/// Runs `rdrop bench eval`.
pub fn bench_eval(a: &EvalArgs) -> anyhow::Result<EvalBench> {
    anyhow::ensure!(
        a.batch_size > 0 && a.iters > 0,
        "--batch-size and --iters must be at least 1"
    );
    let device = a.compute.open()?;
    let explicit = a.compute.explicit()?;
    let mut vc = ViTConfig::preset(&a.model)?;
    if let Some(s) = a.image_size {
        vc.image_size = s;
    }
    let mut model = crate::setup::new_model(&vc, 0, &device)?;
    model.set_compute_dtype(a.compute.precision.dtype())?;
    let mut p = Predictor::new(model, explicit)?;
    let s = vc.image_size;
    let x = Tensor::randn(0f32, 1f32, (a.batch_size, 3, s, s), &Device::Cpu)?.to_device(&device)?;
    p.logits(&x)?;
    device.synchronize()?;
    let t0 = std::time::Instant::now();
    for _ in 0..a.iters {
        p.logits(&x)?;
    }
    device.synchronize()?;
    let wall = t0.elapsed().as_secs_f64();
    Ok(EvalBench {
        images_per_s: (a.batch_size * a.iters) as f64 / wall,
        peak_gib: if device.is_cpu() {
            peak_rss_gib()
        } else {
            None
        },
        model: a.model.clone(),
        image_size: s,
        batch_size: a.batch_size,
        iters: a.iters,
        engine: if explicit { "explicit" } else { "autograd" }.into(),
        device: a.compute.device.to_string(),
        threads: rayon::current_num_threads(),
    })
}

/// Arguments of `rdrop bench train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Architecture preset: cpu-small (image 32, patch 4, D 192, 6 layers, 3 heads, MLP 768),
    /// tiny, vit-ti16, vit-s16, vit-b16, vit-b32, vit-l16.
    #[arg(long, default_value = "cpu-small")]
    pub model: String,
    /// Input side in pixels.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Samples per update (each goes through two passes).
    #[arg(long, default_value_t = 64)]
    pub micro_batch: usize,
    /// Timed updates.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed updates first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// `concat` (one forward of [x; x]) or `sequential`.
    #[arg(long, value_enum, default_value_t = Passes::Concat)]
    pub passes: Passes,
    /// Overrides every dropout rate of the model (0 measures the step without dropout masks).
    #[arg(long, value_name = "P")]
    pub dropout: Option<f64>,
    /// Classes of the synthetic task (default: the preset's).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `rdrop bench train --json` prints.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    /// Model preset.
    pub model: String,
    /// Input side.
    pub image_size: usize,
    /// Samples per update.
    pub micro_batch: usize,
    /// Timed updates.
    pub steps: usize,
    /// Precision.
    pub precision: String,
    /// `explicit` or `autograd`.
    pub engine: String,
    /// Device.
    pub device: String,
    /// CPU threads used by candle and the engine.
    pub threads: usize,
    /// Parameters of the model.
    pub params: usize,
    /// R-Drop samples per second (each sample = two passes).
    pub samples_per_s: f64,
    /// Mean wall time per update in ms.
    pub step_ms: f64,
    /// Mean time in the two forward passes and the loss, ms per update.
    pub forward_ms: f64,
    /// Mean time in the backward pass, ms per update.
    pub backward_ms: f64,
    /// Mean time in clipping and the optimiser step, ms per update.
    pub optimizer_ms: f64,
    /// Peak memory in GiB: resident set of the process on CPU (VmHWM); on CUDA the largest
    /// device memory in use seen after each update (cuMemGetInfo; all processes on the GPU).
    pub peak_gib: Option<f64>,
    /// What `peak_gib` measures.
    pub peak_kind: String,
    /// The explicit engine's activation plan (saved activations and scratch), GiB; `None`
    /// for the autograd model.
    pub plan_gib: Option<f64>,
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Eval(a) => {
            let r = bench_eval(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} @ {} px, batch {}, {} engine on {} ({} threads): {:.2} images/s; peak {}",
                    r.model,
                    r.image_size,
                    r.batch_size,
                    r.engine,
                    r.device,
                    r.threads,
                    r.images_per_s,
                    r.peak_gib
                        .map(|g| format!("{g:.2} GiB (process peak RSS)"))
                        .unwrap_or_else(|| "n/a".into()),
                );
            }
            Ok(())
        }
        Command::Train(a) => {
            let r = bench_train(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} @ {} px, micro-batch {}, {} {} engine on {} ({} threads): {:.1} R-Drop samples/s, {:.1} ms/update \
                     (forward {:.1}, backward {:.1}, optimiser {:.1}); peak {} {}{}",
                    r.model,
                    r.image_size,
                    r.micro_batch,
                    r.precision,
                    r.engine,
                    r.device,
                    r.threads,
                    r.samples_per_s,
                    r.step_ms,
                    r.forward_ms,
                    r.backward_ms,
                    r.optimizer_ms,
                    r.peak_gib.map(|g| format!("{g:.2} GiB")).unwrap_or_else(|| "n/a".into()),
                    r.peak_kind,
                    r.plan_gib
                        .map(|g| format!("; activation plan {g:.2} GiB"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

/// Peak resident set size of this process (Linux `/proc/self/status`, VmHWM), GiB.
fn peak_rss_gib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / (1024.0 * 1024.0))
}

/// Device memory in use (total − free), GiB.
#[cfg(feature = "cuda")]
fn cuda_used_gib(device: &Device) -> Option<f64> {
    let dev = device.as_cuda_device().ok()?;
    let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as f64 / (1u64 << 30) as f64)
}

#[cfg(not(feature = "cuda"))]
fn cuda_used_gib(_device: &Device) -> Option<f64> {
    None
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Runs the benchmark.
pub fn bench_train(a: &TrainArgs) -> anyhow::Result<BenchResult> {
    anyhow::ensure!(
        a.micro_batch > 0 && a.steps > 0,
        "--micro-batch and --steps must be at least 1"
    );
    let device = a.compute.open()?;
    let explicit = a.compute.explicit()?;
    let mut vc = ViTConfig::preset(&a.model)?;
    if let Some(s) = a.image_size {
        vc.image_size = s;
    }
    if let Some(n) = a.num_classes {
        vc.num_classes = n;
    }
    if let Some(p) = a.dropout {
        (
            vc.dropout,
            vc.attention_dropout,
            vc.attention_output_dropout,
        ) = (p, p, p);
    }
    let mut model = crate::setup::new_model(&vc, 0, &device)?;
    model.set_compute_dtype(a.compute.precision.dtype())?;
    let params: usize = model.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    let tcfg = TrainConfig {
        loss: LossConfig::default(),
        optim: OptimConfig {
            lr: 0.01,
            ..OptimConfig::default()
        },
        schedule: ScheduleConfig {
            decay: DecayKind::Constant,
            warmup_steps: 0,
            total_steps: (a.steps + a.warmup) as u64,
            cycles: 0.5,
        },
        clip_norm: Some(1.0),
        accum_steps: 1,
        micro_batch: a.micro_batch,
        two_pass: a.passes,
        precision: a.compute.precision,
        sync_timing: true,
        ..TrainConfig::default()
    };
    let mut trainer = Learner::new(model, tcfg, explicit, None)?;
    let s = vc.image_size;
    let x =
        Tensor::randn(0f32, 1f32, (a.micro_batch, 3, s, s), &Device::Cpu)?.to_device(&device)?;
    let y: Vec<u32> = (0..a.micro_batch)
        .map(|i| (i * 7 % vc.num_classes) as u32)
        .collect();
    let y = Tensor::from_vec(y, a.micro_batch, &device)?;
    let batch = [(x, y)];
    let mut peak_dev: Option<f64> = None;
    for _ in 0..a.warmup {
        trainer.update(&batch)?;
        peak_dev = max_opt(peak_dev, cuda_used_gib(&device));
    }
    let (mut f, mut b, mut o) = (0.0, 0.0, 0.0);
    let t0 = std::time::Instant::now();
    for _ in 0..a.steps {
        let st = trainer.update(&batch)?;
        f += st.forward_s;
        b += st.backward_s;
        o += st.optimizer_s;
        peak_dev = max_opt(peak_dev, cuda_used_gib(&device));
    }
    device.synchronize()?;
    let wall = t0.elapsed().as_secs_f64();
    let n = a.steps as f64;
    let (peak_gib, peak_kind) = if device.is_cpu() {
        (peak_rss_gib(), "process peak RSS (VmHWM)".to_string())
    } else {
        (
            peak_dev,
            "device memory in use (cuMemGetInfo), max over updates".to_string(),
        )
    };
    Ok(BenchResult {
        model: a.model.clone(),
        image_size: s,
        micro_batch: a.micro_batch,
        steps: a.steps,
        precision: a.compute.precision.to_string(),
        engine: trainer.engine_name().into(),
        device: a.compute.device.to_string(),
        threads: rayon::current_num_threads(),
        params,
        samples_per_s: a.micro_batch as f64 * n / wall,
        step_ms: 1e3 * wall / n,
        forward_ms: 1e3 * f / n,
        backward_ms: 1e3 * b / n,
        optimizer_ms: 1e3 * o / n,
        peak_gib,
        peak_kind,
        plan_gib: trainer.plan_bytes().map(|b| b as f64 / (1u64 << 30) as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_eval_runs_both_engines() {
        for engine in [
            rdrop_vit::EngineKind::Explicit,
            rdrop_vit::EngineKind::Autograd,
        ] {
            let a = EvalArgs {
                model: "tiny".into(),
                image_size: None,
                batch_size: 3,
                iters: 2,
                compute: ComputeArgs {
                    engine,
                    ..ComputeArgs::default()
                },
                json: true,
            };
            let r = bench_eval(&a).unwrap();
            assert!(r.images_per_s > 0.0);
            assert!(r.peak_gib.unwrap() > 0.0);
            assert_eq!(r.engine, engine.to_string());
        }
    }

    #[test]
    fn bench_runs_a_tiny_model() {
        let a = TrainArgs {
            model: "tiny".into(),
            image_size: Some(16),
            micro_batch: 4,
            steps: 2,
            warmup: 1,
            compute: ComputeArgs::default(),
            passes: Passes::Concat,
            num_classes: None,
            dropout: None,
            json: true,
        };
        let r = bench_train(&a).unwrap();
        assert!(r.samples_per_s > 0.0 && r.step_ms > 0.0);
        assert!(r.forward_ms > 0.0 && r.backward_ms > 0.0 && r.optimizer_ms >= 0.0);
        assert!(r.forward_ms + r.backward_ms + r.optimizer_ms <= r.step_ms * 1.05);
        assert!(r.peak_gib.unwrap() > 0.0);
        assert!(r.plan_gib.unwrap() > 0.0, "the explicit engine's plan");
        assert_eq!(
            r.params,
            ViTConfig {
                image_size: 16,
                ..ViTConfig::preset("tiny").unwrap()
            }
            .num_params()
        );
    }
}
