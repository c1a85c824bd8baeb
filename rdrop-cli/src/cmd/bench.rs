//! `rdrop bench train`: R-Drop training-step throughput on synthetic data with a randomly
//! initialised model — the same step as `rdrop train` (the explicit engine or the autograd
//! model, `--engine`: two passes, loss, backward, clipping, SGD momentum), timed phase by phase.
//! `rdrop bench eval`: inference throughput of the same models.
//!
//! Comparable with the PyTorch peer benchmark `torch_cpu_step.py THREADS cpu-small` (one
//! forward of [x; x], α 0.3, SGD momentum 0.9, clip 1.0, 3 warm-up steps): "samples/s" counts
//! each training sample once although it goes through the network twice; and with
//! `torch_cpu_eval.py THREADS MODEL BATCH ITERS` (timm, eval mode, no grad). The CPU peer
//! benchmarks are not kept in this repository (`scripts/torch_gpu_step.py` is the GPU one).

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
    /// Time the CPU engine's f32 GEMM (`C = A·B`, the kernel under every linear layer) at one
    /// shape: the peak that `bench train --profile`'s GEMM groups compare against.
    Gemm(GemmArgs),
}

/// Arguments of `rdrop bench gemm`.
#[derive(clap::Args, Debug)]
pub struct GemmArgs {
    /// Rows of A and C.
    #[arg(long, default_value_t = 2048)]
    pub m: usize,
    /// Columns of A, rows of B.
    #[arg(long, default_value_t = 2048)]
    pub k: usize,
    /// Columns of B and C.
    #[arg(long, default_value_t = 2048)]
    pub n: usize,
    /// Timed products (after one untimed).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `rdrop bench gemm --json` prints.
#[derive(Debug, Serialize)]
pub struct GemmBench {
    /// The shape `m×k · k×n`.
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Threads.
    pub threads: usize,
    /// Milliseconds per product.
    pub ms: f64,
    /// Achieved GFLOP/s (`2·m·k·n` per product).
    pub gflops: f64,
}

/// Runs `rdrop bench gemm`.
pub fn bench_gemm(a: &GemmArgs) -> anyhow::Result<GemmBench> {
    anyhow::ensure!(
        a.m > 0 && a.k > 0 && a.n > 0 && a.iters > 0,
        "--m, --k, --n and --iters must be at least 1"
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads.unwrap_or(0))
        .build()?;
    let x: Vec<f32> = (0..a.m * a.k).map(|i| (i % 13) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..a.k * a.n).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut c = vec![0f32; a.m * a.n];
    let mm = |c: &mut [f32]| {
        rdrop_kernels::linear::matmul(c, &x, &w, a.m, a.k, a.n, false, false, 1.0, 0.0)
    };
    let (ms, threads) = pool.install(|| {
        mm(&mut c);
        let t0 = std::time::Instant::now();
        for _ in 0..a.iters {
            mm(&mut c);
        }
        (
            1e3 * t0.elapsed().as_secs_f64() / a.iters as f64,
            rayon::current_num_threads(),
        )
    });
    Ok(GemmBench {
        m: a.m,
        k: a.k,
        n: a.n,
        threads,
        ms,
        gflops: 2.0 * (a.m * a.k * a.n) as f64 / (ms * 1e6),
    })
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
    /// Also time each op group of the step (patch embedding, LayerNorm, QKV GEMM, attention,
    /// projection, MLP GEMMs, GELU and dropout, residual, head, loss, the backward of each,
    /// gradient reduction, optimiser) with its FLOPs, bytes and achieved TFLOP/s and GB/s:
    /// laps of a clock on the CPU, CUDA events on a GPU (explicit engine only).
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One op group of `rdrop bench train --profile`: mean per update.
#[derive(Debug, Serialize)]
pub struct ProfileRow {
    /// The group (`qkv_gemm`, `attention_bwd`, `optimizer`, …).
    pub group: String,
    /// Milliseconds per update.
    pub ms: f64,
    /// Floating-point operations per update (a multiply-add is 2).
    pub flops: f64,
    /// Bytes read and written per update (each operand once).
    pub bytes: f64,
    /// Achieved TFLOP/s.
    pub tflops: f64,
    /// Achieved GB/s.
    pub gbps: f64,
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
    /// With `--profile`: the op groups, mean per update, in step order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<ProfileRow>>,
    /// With `--profile`: the groups' milliseconds summed, per update (compare `step_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_ms: Option<f64>,
    /// With `--profile`: the step's achieved TFLOP/s (all groups' FLOPs over `step_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_tflops: Option<f64>,
}

impl BenchResult {
    /// The profile as a table (group, ms, share of the step, GFLOP, TFLOP/s, GB/s).
    pub fn profile_table(&self) -> Option<String> {
        let rows = self.profile.as_ref()?;
        let mut out = format!(
            "{:<18} {:>9} {:>6} {:>10} {:>9} {:>9}\n",
            "group", "ms", "%", "GFLOP", "TFLOP/s", "GB/s"
        );
        for r in rows {
            out += &format!(
                "{:<18} {:>9.3} {:>6.1} {:>10.3} {:>9.3} {:>9.1}\n",
                r.group,
                r.ms,
                100.0 * r.ms / self.step_ms,
                r.flops / 1e9,
                r.tflops,
                r.gbps
            );
        }
        out += &format!(
            "{:<18} {:>9.3} {:>6.1} {:>10.3} {:>9.3}\n",
            "sum of groups",
            self.profile_ms.unwrap_or(0.0),
            100.0 * self.profile_ms.unwrap_or(0.0) / self.step_ms,
            rows.iter().map(|r| r.flops).sum::<f64>() / 1e9,
            self.step_tflops.unwrap_or(0.0)
        );
        Some(out)
    }
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Gemm(a) => {
            let r = bench_gemm(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "f32 GEMM {}×{} · {}×{} ({} threads): {:.3} ms, {:.1} GFLOP/s",
                    r.m, r.k, r.k, r.n, r.threads, r.ms, r.gflops
                );
            }
            Ok(())
        }
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
                if let Some(t) = r.profile_table() {
                    print!("{t}");
                }
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
    anyhow::ensure!(
        !a.profile || trainer.set_profiling(true),
        "--profile times the explicit engine's ops; --engine {} has no profile",
        a.compute.engine
    );
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
    trainer.take_profile(); // the warm-up's
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
    let step_ms = 1e3 * wall / n;
    let prof = a.profile.then(|| trainer.take_profile().scaled(n));
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
        step_ms,
        forward_ms: 1e3 * f / n,
        backward_ms: 1e3 * b / n,
        optimizer_ms: 1e3 * o / n,
        peak_gib,
        peak_kind,
        plan_gib: trainer.plan_bytes().map(|b| b as f64 / (1u64 << 30) as f64),
        profile_ms: prof.as_ref().map(|p| p.total_ms()),
        step_tflops: prof.as_ref().map(|p| p.total_flops() / (step_ms * 1e9)),
        profile: prof.map(|p| {
            p.groups
                .iter()
                .map(|g| ProfileRow {
                    group: g.group.clone(),
                    ms: g.ms,
                    flops: g.flops,
                    bytes: g.bytes,
                    tflops: g.tflops(),
                    gbps: g.gbps(),
                })
                .collect()
        }),
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
            profile: false,
            json: true,
        };
        let r = bench_train(&a).unwrap();
        assert!(r.profile.is_none());
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

    #[test]
    fn the_profile_names_every_group_and_adds_up_to_the_step() {
        let a = TrainArgs {
            model: "tiny".into(),
            image_size: Some(16),
            micro_batch: 8,
            steps: 3,
            warmup: 1,
            compute: ComputeArgs::default(),
            passes: Passes::Concat,
            num_classes: None,
            dropout: None,
            profile: true,
            json: true,
        };
        let r = bench_train(&a).unwrap();
        let rows = r.profile.as_ref().unwrap();
        let names: Vec<&str> = rows.iter().map(|g| g.group.as_str()).collect();
        let want: Vec<&str> = rdrop_core::profile::GROUPS
            .iter()
            .copied()
            .filter(|g| *g != "grad_reduce")
            .collect();
        assert_eq!(names, want, "every group once, in step order");
        assert!(rows.iter().all(|g| g.ms >= 0.0 && g.bytes > 0.0));
        let gemm = rows.iter().find(|g| g.group == "qkv_gemm").unwrap();
        let cfg = ViTConfig {
            image_size: 16,
            ..ViTConfig::preset("tiny").unwrap()
        };
        let n = (2 * 8 * cfg.num_tokens()) as f64;
        let d = cfg.hidden_size as f64;
        assert_eq!(gemm.flops, cfg.num_layers as f64 * 2.0 * n * d * 3.0 * d);
        // Laps cover the update: only the learner's own bookkeeping is outside them.
        let sum = r.profile_ms.unwrap();
        assert!(sum <= r.step_ms * 1.001, "{sum} > {}", r.step_ms);
        assert!(sum >= 0.5 * r.step_ms, "{sum} of {}", r.step_ms);
        assert!(r.profile_table().unwrap().contains("attention_bwd"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["profile"][0]["group"], "patch_embed");
        for k in ["ms", "flops", "bytes"] {
            assert!(json["profile"][0][k].is_number(), "{k}");
        }
    }

    #[test]
    fn bench_gemm_counts_two_flops_a_multiply_add() {
        let r = bench_gemm(&GemmArgs {
            m: 64,
            k: 32,
            n: 16,
            iters: 2,
            threads: Some(1),
            json: true,
        })
        .unwrap();
        assert_eq!(r.threads, 1);
        assert!((r.gflops - 2.0 * 64.0 * 32.0 * 16.0 / (r.ms * 1e6)).abs() < 1e-9);
        assert!(bench_gemm(&GemmArgs {
            m: 0,
            k: 1,
            n: 1,
            iters: 1,
            threads: None,
            json: false,
        })
        .is_err());
    }

    #[test]
    fn the_autograd_model_has_no_profile() {
        let a = TrainArgs {
            model: "tiny".into(),
            image_size: Some(16),
            micro_batch: 2,
            steps: 1,
            warmup: 0,
            compute: ComputeArgs {
                engine: rdrop_vit::EngineKind::Autograd,
                ..ComputeArgs::default()
            },
            passes: Passes::Concat,
            num_classes: None,
            dropout: None,
            profile: true,
            json: true,
        };
        let e = bench_train(&a).unwrap_err().to_string();
        assert!(e.contains("--profile") && e.contains("autograd"), "{e}");
    }
}
