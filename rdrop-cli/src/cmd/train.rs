//! `rdrop train`: fine-tune (or train from scratch) a ViT with R-Drop
//! (<https://arxiv.org/abs/2106.14448>), composing rdrop-data (the deterministic loader),
//! rdrop-vit (the model, weight loading, HF-layout saving) and rdrop-core (the update,
//! the training state).
//!
//! [`train`] is the loop, top to bottom: an update, its metrics, an evaluation when due, a
//! checkpoint when due. Everything around it lives in named functions here ([`start`],
//! [`Checkpoints`]) or in modules of its own ([`crate::setup`], [`crate::evaluate`],
//! [`crate::metrics`], and rdrop-core's [`rdrop_core::run_folder`] and
//! [`rdrop_core::atomic`]).
//!
//! A run folder `OUT` gets `config.toml` (before step 0), `metrics.jsonl`,
//! `checkpoints/step-N/` (model in the HF `ViTForImageClassification` layout + the training
//! state: optimiser, loss scaler, data position, dropout RNG), `best/`, `final/` and
//! `curves.png`. Checkpoints are atomic ([`rdrop_core::atomic`]); `--resume OUT` (or
//! `rdrop resume OUT`) continues from the newest one, bit-identically on CPU in f32.
//!
//! Data parallel ([`crate::world`]): `--nproc-per-node N` starts N ranks ([`crate::launch`]),
//! or torchrun / Slurm did. Every rank runs this loop on its share of each global batch
//! ([`crate::stream`]) and the trainer all-reduces; rank 0 alone writes the run folder and
//! prints, the others wait for it at a barrier after each write.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use rdrop_core::atomic::{clean_stale, write_dir};
use rdrop_core::run_folder::{prune, step_name};
use rdrop_core::{CoreError, RunFolder, StepStats, TrainState};
use rdrop_data::Loader;
use rdrop_vit::{save_hf, ViTConfig, VisionTransformer};
use serde::{Deserialize, Serialize};

use crate::cmd::Interrupted;
use crate::config::{self, MicroBatch, RunConfig};
use crate::device::{set_threads, DeviceSpec, GpuModel, PrecisionSetting};
use crate::evaluate::{evaluate, EvalResult};
use crate::learner::Learner;
use crate::metrics::{EvalLine, MetricLine, MetricsWriter, TrainLine};
use crate::progress::Progress;
use crate::restart;
use crate::setup;
use crate::signals::{self, Stop, StopFlag};
use crate::stream::{Position, Share, Stream};
use crate::test_hooks;
use crate::world::{self, Role, World};

/// `rdrop train --help`, after the flags.
const TRAIN_HELP: &str =
    "Settings come from a preset (--preset), then a TOML file (--config; same keys as the
OUT/config.toml a run writes), then the flags above. Examples:

  rdrop train --preset demo                      # embedded digits, tiny ViT, CPU, ~2 min

  rdrop train --preset vit-b16-cifar100 --data cifar-100-python.tar.gz --device cuda

  rdrop train --data cifar-100-python.tar.gz --dry-run   # print the resolved config.toml

  rdrop train --resume runs/demo-20260101-120000 # continue an interrupted run

  rdrop train --preset vit-b16-cifar100 --data cifar-100-python.tar.gz --nproc-per-node 8

  torchrun --no-python --nproc-per-node 8 rdrop train ...   # or srun rdrop train ...

`--out` is the run's identity. Started again with the same `--out` and configuration, and
with --resume-if-exists (or as a launcher's restart: torchrun --max-restarts, a requeued
Slurm job), the run continues from its newest checkpoint, bit-identically on CPU in f32. Only
--threads, --save-every, --save-every-minutes, --keep-last and the number of ranks (any that
divides the batch into micro-batches) may change on a continue; any other difference is
refused with both values. Under Slurm the default --out is runs/<preset>-slurm-<job id>;
under torchrun --max-restarts, runs/<preset>-torchrun-<rdzv id> (give --out or --rdzv-id).

Signals: SIGINT (Ctrl-C) finishes the current update, writes a checkpoint and exits with
130; SIGTERM and SIGUSR1 (Slurm's --signal=USR1@90) do the same and exit with 75
(\"preempted\": run the same command again to continue). A second signal exits at once; the
last written checkpoint stays whole.";

/// Train a ViT with R-Drop (the examples, the restart rule and the signals: [`TRAIN_HELP`],
/// shown by `rdrop train --help`).
#[derive(clap::Args, Debug)]
#[command(after_long_help = TRAIN_HELP)]
pub struct Args {
    /// Preset: demo, vit-b16-cifar100 (default), vit-src.
    #[arg(long)]
    pub preset: Option<String>,
    /// TOML configuration file (keys as in OUT/config.toml); overrides the preset.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run folder, the run's identity (default: runs/<preset>-<UTC time>; under Slurm
    /// runs/<preset>-slurm-<job id>; under torchrun --max-restarts
    /// runs/<preset>-torchrun-<rdzv id>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// When --out already holds this run (the same configuration), continue it from its newest
    /// checkpoint instead of refusing. A launcher's restart (TORCHELASTIC_RESTART_COUNT or
    /// SLURM_RESTART_COUNT > 0) continues without it.
    #[arg(long, conflicts_with = "resume")]
    pub resume_if_exists: bool,
    /// Under Slurm, after a SIGUSR1 stop has written its checkpoint, requeue the job
    /// (`scontrol requeue $SLURM_JOB_ID`, rank 0), for jobs submitted with
    /// `sbatch --requeue --signal=USR1@90`.
    #[arg(long)]
    pub requeue: bool,
    /// Continue the run in DIR from its newest checkpoint (its config.toml decides the run: of
    /// the other flags only --threads, --nproc-per-node, --requeue and --json count).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Print the fully resolved configuration (the config.toml the run would write) and exit,
    /// without reading data or weights (on CUDA it asks the GPU what `precision = "auto"`
    /// resolves to).
    #[arg(long, conflicts_with = "resume")]
    pub dry_run: bool,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    pub json: bool,
    /// Start N ranks on this node, one per GPU (data parallel through NCCL; batch_size =
    /// N × micro_batch × accumulation). Not needed under torchrun or Slurm's srun.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    #[command(flatten)]
    pub flags: config::Overrides,
}

/// What a finished run reports (`--json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The run folder.
    pub out: String,
    /// Updates done.
    pub steps: u64,
    /// Final test top-1.
    pub top1: f64,
    /// Final test top-5.
    pub top5: f64,
    /// Final test loss.
    pub test_loss: f64,
    /// Best top-1 seen at an evaluation.
    pub best_top1: f64,
    /// Its step.
    pub best_step: u64,
    /// Wall time of this invocation in seconds (data loading and model set-up included).
    pub wall_s: f64,
    /// Ranks that trained (1 without a launcher).
    pub world_size: usize,
    /// What carried the reductions: `nccl`, `tcp` (CPU ranks) or `none` (no launcher).
    pub collective: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.resume {
        if args.preset.is_some() || args.config.is_some() {
            eprintln!(
                "note: --resume uses {}/config.toml; --preset/--config are ignored",
                dir.display()
            );
        }
        return resume_run(
            dir,
            args.flags.threads,
            args.json,
            args.nproc_per_node,
            args.requeue,
        );
    }
    let cfg = config::resolve(args.preset.as_deref(), args.config.as_deref(), &args.flags)?;
    if args.dry_run {
        return dry_run(&cfg, args.nproc_per_node);
    }
    cfg.validate()?;
    let role = world::role(args.nproc_per_node)?;
    let launcher = restart::Launcher::from_env();
    let out = match &args.out {
        Some(o) => o.clone(),
        None => restart::default_out(&cfg.preset, &launcher)?,
    };
    let run_dir = RunFolder::new(&out);
    let spec = match role {
        Role::Launch(n) => {
            world::check(&cfg, n, n, true)?;
            // Refused here, once, rather than by every rank.
            restart::plan(&run_dir, &cfg, args.resume_if_exists, &launcher)?;
            // The ranks must agree on the folder: name the default one for them.
            let extra = match args.out {
                None => vec!["--out".into(), out.into_os_string()],
                Some(_) => Vec::new(),
            };
            return crate::launch::launch(n, &extra);
        }
        Role::Rank(spec) => spec,
    };
    world::check(&cfg, spec.world_size, spec.local_world_size, true)?;
    let stop = signals::install();
    let world = World::join(spec, &cfg)?;
    // Rank 0 decides; the others follow its choice of checkpoint (`choose_start`).
    let plan = if world.is_lead() {
        Some(restart::plan(
            &run_dir,
            &cfg,
            args.resume_if_exists,
            &launcher,
        )?)
    } else {
        None
    };
    let continuing = matches!(plan, Some(restart::Plan::Continue { .. }));
    let start = choose_start(&world, &run_dir, continuing, args.flags.model.clone())?;
    let asked_to_continue = args.resume_if_exists || launcher.restart().is_some();
    if plan == Some(restart::Plan::New) && asked_to_continue {
        eprintln!(
            "{} holds no run yet: starting a new one",
            run_dir.root.display()
        );
    }
    if let Some(restart::Plan::Continue { why }) = &plan {
        let out = run_dir.root.display();
        match &start {
            Start::Resume(ck) => eprintln!(
                "continuing the run in {out} from {} ({why}: same configuration)",
                ck.display()
            ),
            Start::Fresh { .. } => eprintln!(
                "{out} holds this run but no checkpoint yet: starting it again from step 0 ({why})"
            ),
        }
    }
    let run = train(cfg, run_dir, start, stop, args.requeue, &world);
    end_rank(world, run, args.json)
}

/// Where every rank of `world` starts: rank 0's newest whole checkpoint of `run_dir` (when
/// `lead_continues`, or for any rank that finds one: a new run has none), agreed by every rank
/// ([`restart::agree`]), else step 0. Rank 0 first removes the temporary folders of writes that
/// a death interrupted.
fn choose_start(
    world: &World,
    run_dir: &RunFolder,
    lead_continues: bool,
    required_model: Option<String>,
) -> anyhow::Result<Start> {
    if world.is_lead() && lead_continues {
        clean_stale(&run_dir.checkpoints())?;
    }
    // Nothing is read before rank 0 has cleaned, nor written before every rank has chosen.
    world.barrier()?;
    let (own, skipped) = if world.is_lead() && !lead_continues {
        (None, Vec::new())
    } else {
        restart::newest_checkpoint(run_dir)
    };
    if world.is_lead() {
        for p in skipped {
            eprintln!(
                "note: {} is not a whole checkpoint (no model or training state): skipped",
                p.display()
            );
        }
    }
    restart::agree(world, own.as_ref().map(|o| o.0), &run_dir.root)?;
    world.barrier()?;
    Ok(match own {
        Some((_, ck)) => Start::Resume(ck),
        None => Start::Fresh { required_model },
    })
}

/// The end of a rank's run. A finished run: goodbye to the other ranks and rank 0's report.
/// An interrupt (every rank stopped at the same update, after the checkpoint's barrier): a
/// goodbye too, so that the ranks leaving together are not taken for deaths (a rank still
/// leaving the barrier would otherwise see rank 0's connection close and exit as if it had
/// died). Any other error: no goodbye, the others learn that this rank died.
fn end_rank(world: World, run: anyhow::Result<Summary>, json: bool) -> anyhow::Result<()> {
    match run {
        Ok(summary) => finish(world, &summary, json),
        Err(e) if e.is::<Interrupted>() => {
            if let Err(f) = world.finish() {
                eprintln!("note: {f:#}");
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// After a finished run: goodbye to the other ranks, rank 0's report.
fn finish(world: World, summary: &Summary, json: bool) -> anyhow::Result<()> {
    let lead = world.is_lead();
    world.finish()?;
    if lead {
        report(summary, json)?;
    }
    Ok(())
}

/// `--dry-run`: the resolved `config.toml` on stdout; settings checked, nothing opened. With
/// `--nproc-per-node N`, the world on stderr (checked except for this machine's GPUs).
fn dry_run(cfg: &RunConfig, nproc_per_node: Option<usize>) -> anyhow::Result<()> {
    cfg.validate_settings()?;
    let n = nproc_per_node.unwrap_or(1).max(1);
    world::check(cfg, n, n, false)?;
    print!("{}", cfg.to_toml()?);
    if let (DeviceSpec::Cuda(_), PrecisionSetting::Auto | PrecisionSetting::Bf16) =
        (cfg.device, cfg.precision)
    {
        eprintln!("{}", dry_run_precision(cfg)?);
    }
    if cfg.micro_batch == MicroBatch::Auto {
        eprintln!("{}", dry_run_micro_batch(cfg, n)?);
    }
    if n > 1 {
        let accum = cfg.batch_size / (n * cfg.micro());
        eprintln!(
            "world: {n} ranks on this node (--nproc-per-node {n}; cuda:0..cuda:{}): each takes {} images of every global batch of {} ({n} ranks × micro-batch {} × accumulation {accum})",
            n - 1,
            cfg.batch_size / n,
            cfg.batch_size,
            cfg.micro_batch
        );
    }
    if cfg.data.is_none() {
        eprintln!("note: no --data yet; a real run needs one");
    }
    Ok(())
}

/// `--dry-run` on CUDA: what `auto` resolves to on this machine's GPU (a CUDA build with a
/// GPU: the device is opened to ask the driver), else the rule; bf16 on a GPU without it is
/// refused as the run would.
fn dry_run_precision(cfg: &RunConfig) -> anyhow::Result<String> {
    let gpu = if candle_core::utils::cuda_is_available() {
        cfg.device.open().ok().and_then(|d| GpuModel::of(&d))
    } else {
        None
    };
    let p = cfg.precision.resolve(&cfg.device, gpu.as_ref())?;
    Ok(match (gpu, cfg.precision) {
        (Some(g), PrecisionSetting::Auto) => format!(
            "precision: auto is {p} on {} (compute capability {}.{})",
            g.name, g.cc.0, g.cc.1
        ),
        (None, PrecisionSetting::Auto) => format!(
            "precision: auto (no GPU here to ask): bf16 on GPUs of compute capability 8.0 and \
             newer, f16 with dynamic loss scaling below; decided when the run opens {}",
            cfg.device
        ),
        _ => format!("precision: {p}"),
    })
}

/// `--dry-run` with `micro_batch = auto`: what it resolves to on this machine's GPU (a CUDA
/// build with a GPU: the device is opened and asked for its memory; the model as its preset
/// or `[vit]` says, with CIFAR-100's 100 classes), else when it will be decided.
fn dry_run_micro_batch(cfg: &RunConfig, ranks: usize) -> anyhow::Result<String> {
    let per_rank = cfg.batch_size / ranks;
    let classes = 100;
    let vc = match cfg
        .vit
        .architecture(cfg.image_size, classes, cfg.layer_norm_eps)
    {
        Some(v) => Some(v),
        None => cfg
            .model
            .as_deref()
            .map(ViTConfig::preset)
            .transpose()?
            .map(|v| ViTConfig {
                image_size: cfg.image_size,
                num_classes: classes,
                dropout: cfg.vit.dropout,
                attention_dropout: cfg.vit.attention_dropout,
                attention_output_dropout: cfg.vit.attention_output_dropout,
                ..v
            }),
    };
    let device = match cfg.device {
        DeviceSpec::Cuda(_) if candle_core::utils::cuda_is_available() => cfg.device.open().ok(),
        DeviceSpec::Cpu => Some(Device::Cpu),
        _ => None,
    };
    let (Some(vc), Some(device)) = (vc, device) else {
        return Ok(format!(
            "micro-batch auto: decided when the run opens {} (the largest divisor of {per_rank} \
             whose activation plan fits the GPU's free memory less max(1/16, 512 MiB))",
            cfg.device
        ));
    };
    let gpu = GpuModel::of(&device);
    let precision = cfg.precision.resolve(&cfg.device, gpu.as_ref())?;
    let explicit = crate::device::use_explicit(cfg.engine, &cfg.device, precision)?;
    let memory = if explicit {
        crate::micro::gpu_memory(&device)
    } else {
        None
    };
    let name = gpu.map_or_else(|| cfg.device.to_string(), |g| g.name);
    let cfg = RunConfig {
        precision: precision.into(),
        ..cfg.clone()
    };
    let c = crate::micro::choose(&vc, &cfg, precision, per_rank, memory, &name, false)?;
    Ok(format!("{} on {name}", c.why))
}

/// How the gradients are summed over the ranks, for the run's header.
fn describe_buckets(buckets: Option<Vec<usize>>) -> String {
    let size = |n: usize| {
        let kib = n as f64 * 4.0 / 1024.0;
        if kib < 1024.0 {
            format!("{kib:.1} KiB")
        } else {
            format!("{:.1} MiB", kib / 1024.0)
        }
    };
    match buckets {
        Some(b) if b.len() > 1 => format!(
            "gradients summed in {} buckets ({} to {}) during the backward",
            b.len(),
            size(b.iter().copied().min().unwrap_or(0)),
            size(b.iter().copied().max().unwrap_or(0))
        ),
        Some(b) => format!(
            "gradients summed in one bucket of {} at the end of the backward",
            size(b.iter().sum())
        ),
        None => "gradients summed in one all-reduce after the backward".into(),
    }
}

/// `rdrop resume OUT` / `rdrop train --resume OUT`, on `nproc_per_node` ranks (or those a
/// launcher started): any number that divides the batch, with the same data order.
pub fn resume_run(
    dir: &Path,
    threads: Option<usize>,
    json: bool,
    nproc_per_node: Option<usize>,
    requeue: bool,
) -> anyhow::Result<()> {
    let run_dir = RunFolder::new(dir);
    let cfg_path = run_dir.config();
    anyhow::ensure!(
        cfg_path.is_file(),
        "{} not found: {} is not a run folder of `rdrop train`",
        cfg_path.display(),
        dir.display()
    );
    let mut cfg = RunConfig::load(&cfg_path)?;
    if threads.is_some() {
        cfg.threads = threads;
    }
    cfg.validate()?;
    let spec = match world::role(nproc_per_node)? {
        Role::Launch(n) => {
            world::check(&cfg, n, n, true)?;
            return crate::launch::launch(n, &[]);
        }
        Role::Rank(spec) => spec,
    };
    world::check(&cfg, spec.world_size, spec.local_world_size, true)?;
    let stop = signals::install();
    let world = World::join(spec, &cfg)?;
    let start = choose_start(&world, &run_dir, true, None)?;
    if world.is_lead() && matches!(start, Start::Fresh { .. }) {
        eprintln!(
            "no checkpoint in {} yet: starting over from step 0 with its config.toml",
            dir.display()
        );
    }
    let run = train(cfg, run_dir, start, stop, requeue, &world);
    end_rank(world, run, json)
}

fn report(s: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
    } else {
        println!(
            "done: {} updates, test top-1 {:.2}% (top-5 {:.2}%, loss {:.4}); best top-1 {:.2}% at step {}; {:.1} s\nrun folder: {}",
            s.steps,
            100.0 * s.top1,
            100.0 * s.top5,
            s.test_loss,
            100.0 * s.best_top1,
            s.best_step,
            s.wall_s,
            s.out
        );
    }
    Ok(())
}

/// How a run begins.
pub enum Start {
    /// From step 0. `required_model` is an explicit `--model`, which weights with a
    /// `config.json` must match.
    Fresh { required_model: Option<String> },
    /// From this checkpoint folder.
    Resume(PathBuf),
}

/// Runs (or resumes) the training described by `cfg` in `dir`, as one rank of `world`. `stop`:
/// the signals' flag; `requeue`: requeue the Slurm job after a SIGUSR1 stop.
pub fn train(
    cfg: RunConfig,
    dir: RunFolder,
    start: Start,
    stop: StopFlag,
    requeue: bool,
    world: &World,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let lead = world.is_lead();
    set_threads(cfg.threads)?;
    let data_name = cfg.data.clone().unwrap_or_default();
    let data = setup::open_data(&data_name)?;
    let classes = data.num_classes();
    let class_names = (!data.fine_label_names.is_empty()).then(|| data.fine_label_names.clone());
    let device = world::device(&cfg, &world.spec).open()?;
    // config.toml records the settings as given (`auto` stays `auto`, resolved again for the
    // GPU of each start); the run computes in the precision resolved for this GPU.
    let record = cfg.clone();
    let precision = cfg
        .precision
        .resolve(&cfg.device, GpuModel::of(&device).as_ref())?;
    let cfg = RunConfig {
        precision: precision.into(),
        ..cfg
    };
    if lead {
        std::fs::create_dir_all(&dir.root)
            .with_context(|| format!("cannot create {}", dir.root.display()))?;
    }
    let Session {
        mut learner,
        position,
        mut best,
        mut metrics,
        micro: (micro_batch, micro_why),
    } = self::start(&cfg, &record, &dir, start, classes, &device, world)?;
    let cfg = RunConfig {
        micro_batch: MicroBatch::Fixed(micro_batch),
        ..cfg
    };
    let (train_loader, test_loader) = setup::loaders(&cfg, data)?;
    let share = Share {
        world: world.size(),
        rank: world.rank(),
        accumulation: cfg.accumulation() / world.size(),
    };
    if lead {
        announce(
            &cfg,
            &dir,
            &learner,
            &data_name,
            (&train_loader, &test_loader),
            classes,
            &match record.precision {
                PrecisionSetting::Auto => format!("{precision} (auto)"),
                _ => precision.to_string(),
            },
        );
        if let Some(why) = &micro_why {
            eprintln!("{why}");
        }
        if world.collective().is_some() {
            eprintln!(
                "data parallel: {}; each rank takes {} × {} images of every update; {}",
                world.describe(),
                share.accumulation,
                cfg.micro_batch,
                describe_buckets(learner.grad_buckets(cfg.grad_bucket_mb))
            );
        }
    }
    let checkpoints = Checkpoints {
        dir: dir.clone(),
        keep_last: cfg.keep_last,
        class_names,
    };

    let mut stream = Stream::new(Arc::new(train_loader), position, share)?;
    let mut progress = Progress::new(learner.step(), cfg.steps, lead);
    let position_step = learner.step();
    let mut last_eval: Option<EvalResult> = None;
    // Rank 0's clock decides the timed checkpoints (`--save-every-minutes`).
    let mut last_save = Instant::now();
    while learner.step() < cfg.steps {
        // One update: this rank's micro-batches, two passes each, one optimiser step.
        let t0 = Instant::now();
        let batches = stream.next_update(&device)?;
        let stats = match learner.update(&batches) {
            Ok(s) => s,
            Err(e) => {
                progress.finish();
                return Err(update_error(e, learner.step() + 1, &dir));
            }
        };
        if let Some(m) = metrics.as_mut() {
            log_update(m, &mut progress, &stats, stream.pos.epoch, t0)?;
        }
        if stats.skipped {
            progress.println(&format!(
                "step {}: f16 overflow, update skipped ({} so far); loss scale now {}",
                stats.step,
                stats.skipped_total,
                learner.loss_scale()
            ));
        }
        test_hooks::after_update();
        if lead && stats.step == position_step + 1 {
            if let Some((free, total)) = crate::micro::gpu_memory(&device) {
                progress.println(&format!(
                    "GPU memory after the first update: {} MiB in use of {} MiB",
                    (total - free) >> 20,
                    total >> 20
                ));
            }
        }

        let step = stats.step;
        let last = step == cfg.steps;
        if last || due(step, cfg.eval_every) {
            let e = evaluate(|x| learner.logits(x), &test_loader, &device, world)?;
            if let Some(m) = metrics.as_mut() {
                log_eval(m, &mut progress, step, stream.pos.epoch, &e)?;
            }
            if e.top1 > best.top1 || best.step == 0 {
                best = Best { top1: e.top1, step };
                if lead {
                    checkpoints.save_best(learner.model()?, step, &e)?;
                }
                world.barrier()?;
            }
            last_eval = Some(e);
        }
        // Every rank stops at the same update when any of them got a signal, and checkpoints
        // when rank 0's clock says so.
        let minutes = cfg.save_every_minutes;
        let timed = lead && minutes > 0.0 && last_save.elapsed().as_secs_f64() >= minutes * 60.0;
        let (stop_now, timed) = exchange(world, stop.get(), timed)?;
        if let Some(s) = stop_now {
            if let Some(m) = metrics.as_mut() {
                let ck = checkpoints.save(&mut learner, stream.pos, best, m)?;
                progress.finish();
                let _ = crate::cmd::plot::plot_run(&dir, &dir.curves());
                eprintln!("checkpoint written: {}", ck.display());
                if requeue && s == Stop::Preempt {
                    requeue_slurm_job();
                }
            }
            world.barrier()?;
            return Err(Interrupted {
                resume_hint: format!("rdrop resume {}", dir.root.display()),
                stop: s,
            }
            .into());
        }
        if last || due(step, cfg.save_every) || timed {
            if let Some(m) = metrics.as_mut() {
                checkpoints.save(&mut learner, stream.pos, best, m)?;
            }
            last_save = Instant::now();
            world.barrier()?;
        }
    }
    progress.finish();

    if lead {
        checkpoints.save_final(learner.model()?)?;
        if let Err(e) = crate::cmd::plot::plot_run(&dir, &dir.curves()) {
            eprintln!("warning: could not draw curves.png: {e:#}");
        }
    }
    world.barrier()?;
    let e = match last_eval {
        Some(e) => e,
        None => evaluate(|x| learner.logits(x), &test_loader, &device, world)?,
    };
    Ok(Summary {
        out: dir.root.display().to_string(),
        steps: learner.step(),
        top1: e.top1,
        top5: e.top5,
        test_loss: e.loss,
        best_top1: best.top1,
        best_step: best.step,
        wall_s: started.elapsed().as_secs_f64(),
        world_size: world.size(),
        collective: world.collective_name().into(),
    })
}

/// The stop requested on any rank (the strongest: SIGUSR1 > SIGTERM > SIGINT) and rank 0's
/// timed checkpoint, the same on every rank: one reduction per update.
fn exchange(
    world: &World,
    stop: Option<Stop>,
    timed: bool,
) -> anyhow::Result<(Option<Stop>, bool)> {
    let mut v = [0.0f64; Stop::ALL.len() + 1];
    if let Some(s) = stop {
        v[s as usize - 1] = 1.0;
    }
    v[Stop::ALL.len()] = f64::from(u8::from(timed));
    world.sum(&mut v)?;
    let stop = Stop::ALL
        .into_iter()
        .rev()
        .find(|s| v[*s as usize - 1] > 0.0);
    Ok((stop, v[Stop::ALL.len()] > 0.0))
}

/// `scontrol requeue $SLURM_JOB_ID` (`--requeue`, after a SIGUSR1 stop's checkpoint), as
/// Lightning's Slurm auto-requeue does. A failure is a warning: the checkpoint is written and a
/// later start of the same command continues the run.
fn requeue_slurm_job() {
    let Ok(job) = std::env::var("SLURM_JOB_ID") else {
        eprintln!("note: --requeue: not a Slurm job (no SLURM_JOB_ID): nothing to requeue");
        return;
    };
    match std::process::Command::new("scontrol")
        .args(["requeue", &job])
        .status()
    {
        Ok(st) if st.success() => eprintln!("requeued Slurm job {job} (scontrol requeue {job})"),
        Ok(st) => {
            eprintln!("warning: scontrol requeue {job} failed ({st}); the job was not requeued")
        }
        Err(e) => {
            eprintln!("warning: cannot run scontrol requeue {job} ({e}); the job was not requeued")
        }
    }
}

/// Whether a periodic action (`every` updates, 0 = never) falls on `step`.
fn due(step: u64, every: u64) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// What the loop starts from: model and trainer, data position, best evaluation, metrics file
/// (rank 0's: the others write nothing).
struct Session {
    learner: Learner,
    position: Position,
    best: Best,
    metrics: Option<MetricsWriter>,
    /// The micro-batch the run takes (the number set, or what `auto` chose) and, for `auto`,
    /// how it was chosen.
    micro: (usize, Option<String>),
}

/// The run's micro-batch: the number set, the one `config.toml` recorded when a run with
/// `auto` continues (`recorded`), or `auto`'s choice for `model` on `device` (rank 0's, sent to
/// every rank).
fn decide_micro_batch(
    cfg: &RunConfig,
    vc: &rdrop_vit::ViTConfig,
    recorded: Option<usize>,
    device: &Device,
    explicit: bool,
    world: &World,
) -> anyhow::Result<(usize, Option<String>)> {
    if let MicroBatch::Fixed(m) = cfg.micro_batch {
        return Ok((m, None));
    }
    if let Some(m) = recorded {
        return Ok((m, Some(format!("micro-batch auto: {m}, as the run chose"))));
    }
    let per_rank = cfg.batch_size / world.size();
    let memory = if explicit {
        crate::micro::gpu_memory(device)
    } else {
        None
    };
    let gpu = crate::device::GpuModel::of(device).map_or_else(|| "the GPU".into(), |g| g.name);
    let own = crate::micro::choose(
        vc,
        cfg,
        cfg.compute_precision(),
        per_rank,
        memory,
        &gpu,
        true,
    )?;
    // Every rank must take the same micro-batch: rank 0's.
    let mut v = [if world.is_lead() {
        own.micro_batch as f64
    } else {
        0.0
    }];
    world.sum(&mut v)?;
    let lead = v[0] as usize;
    anyhow::ensure!(
        lead <= own.micro_batch,
        "rank {} fits a micro-batch of {} on its GPU, rank 0 chose {lead}: give --micro-batch",
        world.rank(),
        own.micro_batch
    );
    Ok((lead, Some(own.why)))
}

/// A fresh session (writing `record`, the configuration as given, to `config.toml` and a new
/// `metrics.jsonl`), or one restored from a checkpoint (its model, optimiser, scaler, RNG and
/// data position; metrics after its step are dropped). `cfg` is the run's, its precision
/// resolved.
fn start(
    cfg: &RunConfig,
    record: &RunConfig,
    dir: &RunFolder,
    start: Start,
    classes: usize,
    device: &Device,
    world: &World,
) -> anyhow::Result<Session> {
    let explicit = crate::device::use_explicit(cfg.engine, &cfg.device, cfg.compute_precision())?;
    let lead = world.is_lead();
    // The training configuration once the micro-batch is decided.
    let tcfg_for = |m: usize| {
        let c = RunConfig {
            micro_batch: MicroBatch::Fixed(m),
            ..cfg.clone()
        };
        let mut tcfg = c.train_config();
        // Each rank accumulates its share of the update's micro-batches.
        tcfg.accum_steps = c.accumulation() / world.size();
        tcfg
    };
    match start {
        Start::Fresh { required_model } => {
            if let (Some(spec), true) = (&cfg.weights, world.size() > 1) {
                // One download into the shared cache; the other ranks then read it.
                if lead {
                    crate::hub::prefetch(spec)?;
                }
                world.barrier()?;
            }
            let model = setup::initial_model(cfg, classes, required_model.as_deref(), device)?;
            // Decided with the model on the GPU, before the engine allocates anything.
            let micro = decide_micro_batch(cfg, model.config(), None, device, explicit, world)?;
            let learner = Learner::new(model, tcfg_for(micro.0), explicit, world.collective())?;
            let metrics = if lead {
                // The resolved configuration, before step 0 (`--dry-run` prints the same text),
                // with the micro-batch `auto` chose.
                let record = RunConfig {
                    micro_batch: MicroBatch::Fixed(micro.0),
                    ..record.clone()
                };
                rdrop_core::atomic::write_bytes(&dir.config(), record.to_toml()?.as_bytes())?;
                Some(MetricsWriter::create(&dir.metrics())?)
            } else {
                None
            };
            Ok(Session {
                learner,
                position: Position::default(),
                best: Best::default(),
                metrics,
                micro,
            })
        }
        Start::Resume(ck) => {
            let model = setup::checkpoint_model(cfg, &ck, device)?;
            let state = TrainState::load(&ck)
                .with_context(|| format!("loading the training state of {}", ck.display()))?;
            // A continued run keeps its micro-batch (the data position counts micro-batches).
            let recorded = RunConfig::load(&dir.config())
                .ok()
                .and_then(|r| r.micro_batch.fixed());
            let micro = decide_micro_batch(cfg, model.config(), recorded, device, explicit, world)?;
            let learner = Learner::restore(
                model,
                tcfg_for(micro.0),
                &state,
                explicit,
                world.collective(),
            )?;
            let metrics = if lead {
                eprintln!(
                    "resuming {} from {} (step {})",
                    dir.root.display(),
                    ck.display(),
                    state.step
                );
                Some(MetricsWriter::resume(&dir.metrics(), state.step)?)
            } else {
                None
            };
            Ok(Session {
                learner,
                position: Position {
                    epoch: state.epoch,
                    index: state.batch_index as usize,
                },
                best: serde_json::from_value(state.extra.clone()).unwrap_or_default(),
                metrics,
                micro,
            })
        }
    }
}

/// The one-line description of the run on stderr.
fn announce(
    cfg: &RunConfig,
    dir: &RunFolder,
    learner: &Learner,
    data_name: &str,
    (train, test): (&Loader, &Loader),
    classes: usize,
    precision_label: &str,
) {
    let params = learner.config().num_params();
    eprintln!(
        "training {} ({} parameters) on {} ({} train / {} test images, {} classes), {} updates of {} = {} × {}, {} {} ({} engine{}), out {}",
        if cfg.weights.is_some() { "a pre-trained ViT" } else { "a ViT from scratch" },
        params,
        data_name,
        train.num_images(),
        test.num_images(),
        classes,
        cfg.steps,
        cfg.batch_size,
        cfg.micro_batch,
        cfg.accumulation(),
        cfg.device,
        precision_label,
        learner.engine_name(),
        learner
            .planned_bytes(cfg.micro())
            .map(|b| format!(", activation plan {:.2} GiB", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_default(),
        dir.root.display()
    );
    if let Some(gpu) = learner.gpu_summary() {
        eprintln!("GPU: {gpu}");
    }
}

/// A failed update as the user should read it: a non-finite loss or gradient names the last
/// good checkpoint and what to try.
fn update_error(e: CoreError, step_no: u64, dir: &RunFolder) -> anyhow::Error {
    match e {
        CoreError::NonFinite { step, what, value } => anyhow::anyhow!(
            "non-finite {what} ({value}) at step {step}: training stopped; {}. \
             Lower --lr, enable --clip-grad-norm, or try --precision f16 on CUDA (loss scaling)",
            last_good(dir)
        ),
        e => anyhow::Error::new(e).context(format!("update {step_no}")),
    }
}

fn last_good(dir: &RunFolder) -> String {
    match dir.steps().pop() {
        Some((_, p)) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written yet".into(),
    }
}

/// One `train` line in `metrics.jsonl` and on the progress bar.
fn log_update(
    metrics: &mut MetricsWriter,
    progress: &mut Progress,
    stats: &StepStats,
    epoch: u64,
    t0: Instant,
) -> anyhow::Result<()> {
    let ips = stats.samples as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    metrics.write(&MetricLine::Train(TrainLine {
        step: stats.step,
        epoch,
        lr: stats.lr,
        loss: stats.loss,
        ce: stats.ce,
        kl: stats.kl,
        grad_norm: stats.grad_norm,
        images_per_s: ips,
        loss_scale: stats.loss_scale,
        skipped: stats.skipped,
    }))?;
    progress.update(stats.step, ips, stats.loss, stats.lr);
    Ok(())
}

/// One `eval` line in `metrics.jsonl` and on the progress bar.
fn log_eval(
    metrics: &mut MetricsWriter,
    progress: &mut Progress,
    step: u64,
    epoch: u64,
    e: &EvalResult,
) -> anyhow::Result<()> {
    metrics.write(&MetricLine::Eval(EvalLine {
        step,
        epoch,
        top1: e.top1,
        top5: e.top5,
        test_loss: e.loss,
    }))?;
    progress.eval(step, e.top1, e.top5, e.loss);
    Ok(())
}

/// Best evaluation so far (kept in the training state's `extra`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Best {
    top1: f64,
    step: u64,
}

/// The folders a run writes its model to: `checkpoints/step-N/` (with the training state),
/// `best/` and `final/`, each atomically.
struct Checkpoints {
    dir: RunFolder,
    keep_last: usize,
    class_names: Option<Vec<String>>,
}

impl Checkpoints {
    /// `checkpoints/step-N/` after the trainer's current step; keeps the newest `keep_last`.
    fn save(
        &self,
        learner: &mut Learner,
        pos: Position,
        best: Best,
        metrics: &mut MetricsWriter,
    ) -> anyhow::Result<PathBuf> {
        metrics.sync()?;
        let step = learner.step();
        let mut state = learner.state(pos.epoch, pos.index as u64)?;
        let model = learner.model()?;
        state.extra = serde_json::to_value(best)?;
        let names = self.class_names.as_deref();
        let dir = write_dir(
            &self.dir.checkpoints(),
            &step_name(step),
            |tmp| -> anyhow::Result<()> {
                save_hf(model, tmp, names)?;
                test_hooks::checkpoint_half_written(step);
                state.save(tmp)?;
                Ok(())
            },
        )?;
        prune(&self.dir.checkpoints(), self.keep_last)?;
        Ok(dir)
    }

    /// `best/`: the model and `best.json` (step and scores).
    fn save_best(
        &self,
        model: &VisionTransformer,
        step: u64,
        e: &EvalResult,
    ) -> anyhow::Result<()> {
        let names = self.class_names.as_deref();
        let summary = serde_json::json!({
            "step": step, "top1": e.top1, "top5": e.top5, "test_loss": e.loss
        });
        write_dir(
            &self.dir.root,
            RunFolder::BEST,
            |tmp| -> anyhow::Result<()> {
                save_hf(model, tmp, names)?;
                std::fs::write(
                    tmp.join("best.json"),
                    serde_json::to_string_pretty(&summary)?,
                )?;
                Ok(())
            },
        )?;
        Ok(())
    }

    /// `final/`: the model after the last update.
    fn save_final(&self, model: &VisionTransformer) -> anyhow::Result<()> {
        let names = self.class_names.as_deref();
        write_dir(
            &self.dir.root,
            RunFolder::FINAL,
            |tmp| -> anyhow::Result<()> { Ok(save_hf(model, tmp, names)?) },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::TRAIN_HELP;

    /// The help lists every key that may change on a continue (the preset is only a label).
    #[test]
    fn the_help_names_what_may_change_on_a_continue() {
        for key in crate::restart::MAY_DIFFER
            .iter()
            .filter(|k| **k != "preset")
        {
            let flag = format!("--{}", key.replace('_', "-"));
            assert!(TRAIN_HELP.contains(&flag), "{flag} missing from the help");
        }
    }
}
