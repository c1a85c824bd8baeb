//! `rdrop train`: fine-tune (or train from scratch) a ViT with R-Drop
//! (<https://arxiv.org/abs/2106.14448>), composing rdrop-data (the deterministic loader),
//! rdrop-vit (the model, weight loading, HF-layout saving) and rdrop-core (the update,
//! the training state).
//!
//! A run folder `OUT` gets `config.toml` (before step 0), `metrics.jsonl`,
//! `checkpoints/step-N/` (model in the HF `ViTForImageClassification` layout + the training
//! state: optimiser, loss scaler, data position, dropout RNG), `best/`, `final/` and
//! `curves.png`. Checkpoints are atomic ([`crate::checkpoint`]); `--resume OUT` (or
//! `rdrop resume OUT`) continues from the newest one, bit-identically on CPU in f32.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::{
    CoreError, DecayKind, DropoutRng, LossConfig, LossMode, OptimConfig, ScalerConfig,
    ScheduleConfig, StepStats, TrainConfig, TrainState, Trainer, TwoPass,
};
use rdrop_data::{Augment, Cifar, EpochIter, Loader, LoaderConfig, TrainTransform};
use rdrop_vit::{load_model, save_hf, LoadOptions, ViTConfig, VisionTransformer};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{clean_stale, list_steps, prune, step_name, write_dir_atomic};
use crate::cmd::eval::Accumulator;
use crate::cmd::Interrupted;
use crate::config::{self, AugmentKind, LossReduction, OptimizerKind, Passes, RunConfig, Schedule};
use crate::device::set_threads;
use crate::progress::Progress;
use crate::run_dir::{EvalLine, MetricLine, MetricsWriter, RunDir, TrainLine};
use crate::signals::{self, StopFlag};

/// The embedded demo dataset (scikit-learn digits in CIFAR-100 layout; see assets/README.md).
pub static DEMO_ARCHIVE: &[u8] = include_bytes!("../../assets/digits-demo.tar.gz");

/// Train a ViT with R-Drop.
///
/// Settings come from a preset (--preset), then a TOML file (--config; same keys as the
/// OUT/config.toml a run writes), then the flags below. Examples:
///
///   rdrop train --preset demo                      # embedded digits, tiny ViT, CPU, ~2 min
///
///   rdrop train --preset vit-b16-cifar100 --data cifar-100-python.tar.gz --device cuda
///
///   rdrop train --resume runs/demo-20260101-120000 # continue an interrupted run
///
/// Ctrl-C (or SIGTERM) finishes the current update, writes a checkpoint and exits with code
/// 130; a second Ctrl-C exits at once.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Preset: demo, vit-b16-cifar100 (default), vit-src.
    #[arg(long)]
    pub preset: Option<String>,
    /// TOML configuration file (keys as in OUT/config.toml); overrides the preset.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run folder (default: runs/<preset>-<UTC time>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR from its newest checkpoint (its config.toml; other flags except
    /// --threads are ignored).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    pub json: bool,
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.resume {
        if args.preset.is_some() || args.config.is_some() {
            eprintln!(
                "note: --resume uses {}/config.toml; --preset/--config are ignored",
                dir.display()
            );
        }
        return resume_run(dir, args.flags.threads, args.json);
    }
    let cfg = config::resolve(args.preset.as_deref(), args.config.as_deref(), &args.flags)?;
    cfg.validate()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| config::default_out_dir(&cfg.preset));
    let run_dir = RunDir::new(&out);
    if run_dir.metrics().exists() || run_dir.checkpoints().exists() {
        anyhow::bail!(
            "{} already holds a run; continue it with `rdrop resume {}` or choose another --out",
            out.display(),
            out.display()
        );
    }
    let summary = train(cfg, run_dir, None, signals::install())?;
    report(&summary, args.json)
}

/// `rdrop resume OUT` / `rdrop train --resume OUT`.
pub fn resume_run(dir: &Path, threads: Option<usize>, json: bool) -> anyhow::Result<()> {
    let run_dir = RunDir::new(dir);
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
    clean_stale(&run_dir.checkpoints())?;
    let ckpt = list_steps(&run_dir.checkpoints()).pop();
    if ckpt.is_none() {
        eprintln!(
            "no checkpoint in {} yet: starting over from step 0 with its config.toml",
            dir.display()
        );
    }
    let summary = train(cfg, run_dir, ckpt.map(|c| c.1), signals::install())?;
    report(&summary, json)
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

/// Loads the dataset named by `data` (a path, or `builtin:digits`).
pub fn open_data(data: &str) -> anyhow::Result<Cifar> {
    if data == config::BUILTIN_DEMO {
        return Cifar::from_tar_gz_reader(DEMO_ARCHIVE, config::BUILTIN_DEMO)
            .context("decoding the embedded demo archive");
    }
    let p = Path::new(data);
    anyhow::ensure!(
        p.exists(),
        "dataset not found: {data} (expected cifar-100-python.tar.gz, cifar-10-python.tar.gz or \
         an extracted folder; `rdrop data download` fetches CIFAR-100)"
    );
    Cifar::open(p).with_context(|| format!("reading dataset {data}"))
}

/// The rdrop-core update configuration of a run.
pub fn train_config(c: &RunConfig) -> TrainConfig {
    TrainConfig {
        loss: LossConfig {
            alpha: c.alpha,
            mode: match c.loss_reduction {
                LossReduction::Mean => LossMode::Mean,
                LossReduction::Reference => LossMode::Reference,
            },
            label_smoothing: c.label_smoothing,
        },
        optim: OptimConfig {
            kind: match c.optimizer {
                OptimizerKind::Sgd => rdrop_core::OptimizerKind::Sgd,
                OptimizerKind::Adamw => rdrop_core::OptimizerKind::AdamW,
            },
            lr: c.lr,
            momentum: if c.optimizer == OptimizerKind::Sgd {
                c.momentum
            } else {
                0.0
            },
            weight_decay: c.weight_decay,
            ..OptimConfig::default()
        },
        schedule: ScheduleConfig {
            decay: match c.schedule {
                Schedule::Cosine => DecayKind::Cosine,
                Schedule::Linear => DecayKind::Linear,
            },
            warmup_steps: c.warmup_steps,
            total_steps: c.steps,
            cycles: 0.5,
        },
        clip_norm: (c.clip_grad_norm > 0.0).then_some(c.clip_grad_norm),
        accum_steps: c.accumulation(),
        micro_batch: c.micro_batch,
        two_pass: match c.passes {
            Passes::Concat => TwoPass::Concat,
            Passes::Sequential => TwoPass::Sequential,
        },
        precision: c.precision.into(),
        scaler: ScalerConfig {
            init_scale: c.loss_scale,
            ..ScalerConfig::default()
        },
        sync_timing: false,
    }
}

/// Dropout rates `(hidden, attention, attention output)` after `--dropout`.
fn dropouts(c: &RunConfig, base: &ViTConfig) -> (f64, f64, f64) {
    match c.dropout {
        Some(p) => (p, p, p),
        None => (
            base.dropout,
            base.attention_dropout,
            base.attention_output_dropout,
        ),
    }
}

/// A model with random initialisation (no `--weights`).
pub fn scratch_model(
    c: &RunConfig,
    classes: usize,
    device: &Device,
) -> anyhow::Result<VisionTransformer> {
    let mut vc = match (&c.vit, &c.model) {
        (Some(v), _) => v.clone(),
        (None, Some(m)) => ViTConfig::preset(m)?,
        (None, None) => {
            anyhow::bail!("no --weights and no architecture: pass --model PRESET (e.g. vit-b16)")
        }
    };
    vc.image_size = c.image_size;
    vc.num_classes = classes;
    (
        vc.dropout,
        vc.attention_dropout,
        vc.attention_output_dropout,
    ) = dropouts(c, &vc);
    if let Some(eps) = c.layer_norm_eps {
        vc.layer_norm_eps = eps;
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    VisionTransformer::new(&vc, vb, DropoutRng::new(c.seed)).context("building the model")
}

fn pretrained_model(
    c: &RunConfig,
    spec: &str,
    classes: usize,
    device: &Device,
) -> anyhow::Result<VisionTransformer> {
    let (h, a, ao) = match c.dropout {
        Some(p) => (Some(p), Some(p), Some(p)),
        // The recipe's rates (HF in21k configs say 0.0 everywhere).
        None => (Some(0.1), Some(0.0), Some(0.0)),
    };
    let opts = LoadOptions {
        preset: c.model.clone(),
        num_classes: Some(classes),
        image_size: Some(c.image_size),
        reset_head: c.reset_head,
        layer_norm_eps: c.layer_norm_eps,
        dropout: h,
        attention_dropout: a,
        attention_output_dropout: ao,
        device: device.clone(),
        seed: c.seed,
        hub_cache: None,
        num_heads: None,
    };
    crate::hub::prefetch(spec)?;
    let loaded = load_model(spec, &opts).with_context(|| format!("loading weights `{spec}`"))?;
    eprint!("{}", loaded.report);
    Ok(loaded.model)
}

/// Where the loader is: the next micro-batch to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Position {
    epoch: u64,
    index: usize,
}

/// Micro-batches in order across epochs, from any position.
struct Stream<'a> {
    loader: &'a Loader,
    pos: Position,
    iter: Option<EpochIter>,
}

impl Stream<'_> {
    fn next(&mut self) -> anyhow::Result<rdrop_data::Batch> {
        loop {
            if self.pos.index >= self.loader.batches_per_epoch() {
                self.pos = Position {
                    epoch: self.pos.epoch + 1,
                    index: 0,
                };
                self.iter = None;
            }
            let it = self
                .iter
                .get_or_insert_with(|| self.loader.epoch(self.pos.epoch, self.pos.index));
            match it.next() {
                Some(b) => {
                    self.pos.index += 1;
                    return b.with_context(|| {
                        format!(
                            "reading training batch {} of epoch {}",
                            self.pos.index - 1,
                            self.pos.epoch
                        )
                    });
                }
                None => self.pos.index = usize::MAX,
            }
        }
    }
}

/// Best evaluation so far (kept in the training state's `extra`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Best {
    top1: f64,
    step: u64,
}

/// Test hook: `RDROP_TEST_STALL_CHECKPOINT=N` stalls the write of checkpoint step-N halfway
/// (model written, training state not yet), announcing it on stderr, so that a test can
/// `kill -9` the process there and check that the previous checkpoint stays usable.
fn test_stall(step: u64) {
    if std::env::var("RDROP_TEST_STALL_CHECKPOINT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        == Some(step)
    {
        eprintln!("rdrop-test: stalling checkpoint step-{step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Test hook: `RDROP_TEST_STEP_DELAY_MS=N` sleeps after each update, so that a test can
/// interrupt a tiny run at a step of its choosing.
fn test_delay() {
    if let Some(ms) = std::env::var("RDROP_TEST_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

struct Run {
    cfg: RunConfig,
    dir: RunDir,
    device: Device,
    model: VisionTransformer,
    class_names: Option<Vec<String>>,
    best: Best,
}

impl Run {
    fn checkpoint(
        &self,
        trainer: &Trainer,
        pos: Position,
        metrics: &mut MetricsWriter,
    ) -> anyhow::Result<PathBuf> {
        metrics.sync()?;
        let step = trainer.step();
        let mut state = trainer.state(&self.model, pos.epoch, pos.index as u64);
        state.extra = serde_json::to_value(self.best)?;
        let names = self.class_names.as_deref();
        let dir = write_dir_atomic(&self.dir.checkpoints(), &step_name(step), |tmp| {
            save_hf(&self.model, tmp, names)?;
            test_stall(step);
            state.save(tmp)?;
            Ok(())
        })?;
        prune(&self.dir.checkpoints(), self.cfg.keep_last)?;
        Ok(dir)
    }

    fn evaluate(&self, loader: &Loader) -> anyhow::Result<(f64, f64, f64)> {
        let mut acc = Accumulator::default();
        for batch in loader.epoch(0, 0) {
            let batch = batch.context("reading a test batch")?;
            let (x, _) = batch.to_tensors(DType::F32, &self.device)?;
            let logits = self
                .model
                .forward_t(&x, false)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            acc.add(&logits, &batch.labels);
        }
        let r = acc.result();
        Ok((r.top1, r.top5, r.loss))
    }
}

fn last_good(dir: &RunDir) -> String {
    match list_steps(&dir.checkpoints()).pop() {
        Some((_, p)) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written yet".into(),
    }
}

/// Runs (or resumes from `ckpt`) the training described by `cfg` in `dir`.
pub fn train(
    cfg: RunConfig,
    dir: RunDir,
    ckpt: Option<PathBuf>,
    stop: StopFlag,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    set_threads(cfg.threads)?;
    let data_name = cfg.data.clone().unwrap_or_default();
    let data = open_data(&data_name)?;
    let classes = data.fine_label_names.len().max(data.train.num_classes());
    let class_names = (!data.fine_label_names.is_empty()).then(|| data.fine_label_names.clone());
    let device = cfg.device.open()?;
    std::fs::create_dir_all(&dir.root)
        .with_context(|| format!("cannot create {}", dir.root.display()))?;

    // Model, trainer and data position: fresh or from the checkpoint.
    let tcfg = train_config(&cfg);
    let (model, trainer, pos, best, mut metrics) = match &ckpt {
        Some(ck) => {
            let opts = LoadOptions {
                device: device.clone(),
                seed: cfg.seed,
                ..Default::default()
            };
            let mut model = load_model(&ck.display().to_string(), &opts)
                .with_context(|| format!("loading the model of checkpoint {}", ck.display()))?
                .model;
            model.set_compute_dtype(cfg.precision.dtype())?;
            let state = TrainState::load(ck)
                .with_context(|| format!("loading the training state of {}", ck.display()))?;
            let trainer =
                Trainer::restore(tcfg, &model, &state).context("restoring the trainer")?;
            let best: Best = serde_json::from_value(state.extra.clone()).unwrap_or_default();
            let metrics = MetricsWriter::resume(&dir.metrics(), state.step)?;
            eprintln!(
                "resuming {} from {} (step {})",
                dir.root.display(),
                ck.display(),
                state.step
            );
            let pos = Position {
                epoch: state.epoch,
                index: state.batch_index as usize,
            };
            (model, trainer, pos, best, metrics)
        }
        None => {
            let mut model = match &cfg.weights {
                Some(w) => pretrained_model(&cfg, w, classes, &device)?,
                None => scratch_model(&cfg, classes, &device)?,
            };
            model.set_compute_dtype(cfg.precision.dtype())?;
            let trainer =
                Trainer::new(tcfg, model.named_vars()).context("setting up the trainer")?;
            // The resolved configuration, before step 0.
            std::fs::write(dir.config(), cfg.to_toml()?)
                .with_context(|| format!("cannot write {}", dir.config().display()))?;
            let metrics = MetricsWriter::create(&dir.metrics())?;
            (
                model,
                trainer,
                Position::default(),
                Best::default(),
                metrics,
            )
        }
    };
    let mut trainer = trainer;

    let augment = match cfg.augment {
        AugmentKind::Recipe => Augment::Recipe(TrainTransform {
            image_size: cfg.image_size,
            scale: (cfg.crop_scale[0], cfg.crop_scale[1]),
            ..TrainTransform::default()
        }),
        AugmentKind::None => Augment::None,
    };
    let train_loader = Loader::new(
        Arc::new(data.train),
        LoaderConfig {
            batch_size: cfg.micro_batch,
            image_size: cfg.image_size,
            seed: cfg.seed,
            shuffle: cfg.shuffle,
            drop_last: true,
            augment,
            prefetch: 4,
            threads: None,
        },
    )
    .context("building the training loader")?;
    anyhow::ensure!(
        train_loader.batches_per_epoch() > 0,
        "the training split ({} images) is smaller than one micro-batch ({})",
        train_loader.num_images(),
        cfg.micro_batch
    );
    let test_loader = Loader::new(
        Arc::new(data.test),
        LoaderConfig::test(cfg.image_size, cfg.eval_batch_size),
    )
    .context("building the test loader")?;

    let mut run = Run {
        cfg: cfg.clone(),
        dir: dir.clone(),
        device: device.clone(),
        model,
        class_names,
        best,
    };
    let params: usize = run
        .model
        .named_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    eprintln!(
        "training {} ({} parameters) on {} ({} train / {} test images, {} classes), {} updates of {} = {} × {}, {} {}, out {}",
        if cfg.weights.is_some() { "a pre-trained ViT" } else { "a ViT from scratch" },
        params,
        data_name,
        train_loader.num_images(),
        test_loader.num_images(),
        classes,
        cfg.steps,
        cfg.batch_size,
        cfg.micro_batch,
        cfg.accumulation(),
        cfg.device,
        cfg.precision,
        dir.root.display()
    );

    let mut stream = Stream {
        loader: &train_loader,
        pos,
        iter: None,
    };
    let mut progress = Progress::new(trainer.step(), cfg.steps);
    let mut last_eval: Option<(f64, f64, f64)> = None;
    let accum = cfg.accumulation();
    while trainer.step() < cfg.steps {
        let t0 = Instant::now();
        let mut mbs = Vec::with_capacity(accum);
        for _ in 0..accum {
            let b = stream.next()?;
            mbs.push(b.to_tensors(DType::F32, &device)?);
        }
        let epoch = stream.pos.epoch;
        let step_no = trainer.step() + 1;
        let stats: StepStats = match trainer.update(&run.model, &mbs) {
            Ok(s) => s,
            Err(CoreError::NonFinite { step, what, value }) => {
                progress.finish();
                anyhow::bail!(
                    "non-finite {what} ({value}) at step {step}: training stopped; {}. \
                     Lower --lr, enable --clip-grad-norm, or try --precision f16 on CUDA (loss scaling)",
                    last_good(&dir)
                );
            }
            Err(e) => return Err(e).with_context(|| format!("update {step_no}")),
        };
        if !stats.skipped && !(stats.loss.is_finite()) {
            progress.finish();
            anyhow::bail!(
                "non-finite loss ({}) at step {}: training stopped; {}",
                stats.loss,
                stats.step,
                last_good(&dir)
            );
        }
        let dt = t0.elapsed().as_secs_f64();
        let ips = stats.samples as f64 / dt.max(1e-9);
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
        if stats.skipped {
            progress.println(&format!(
                "step {}: f16 overflow, update skipped ({} so far); loss scale now {}",
                stats.step,
                stats.skipped_total,
                trainer.loss_scale()
            ));
        }
        progress.update(stats.step, ips, stats.loss, stats.lr);
        test_delay();
        let step = stats.step;
        let last = step == cfg.steps;
        if last || (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) {
            let (top1, top5, loss) = run.evaluate(&test_loader)?;
            metrics.write(&MetricLine::Eval(EvalLine {
                step,
                epoch,
                top1,
                top5,
                test_loss: loss,
            }))?;
            progress.eval(step, top1, top5, loss);
            last_eval = Some((top1, top5, loss));
            if top1 > run.best.top1 || run.best.step == 0 {
                run.best = Best { top1, step };
                let names = run.class_names.clone();
                write_dir_atomic(&dir.root, "best", |tmp| {
                    save_hf(&run.model, tmp, names.as_deref())?;
                    std::fs::write(
                        tmp.join("best.json"),
                        serde_json::to_string_pretty(
                            &serde_json::json!({"step": step, "top1": top1, "top5": top5, "test_loss": loss}),
                        )?,
                    )?;
                    Ok(())
                })?;
            }
        }
        let pos_now = stream.pos;
        if stop.is_set() {
            let ck = run.checkpoint(&trainer, pos_now, &mut metrics)?;
            progress.finish();
            let _ = crate::cmd::plot::plot_run(&dir, &dir.curves());
            eprintln!("checkpoint written: {}", ck.display());
            return Err(Interrupted {
                resume_hint: format!("rdrop resume {}", dir.root.display()),
            }
            .into());
        }
        if last || (cfg.save_every > 0 && step.is_multiple_of(cfg.save_every)) {
            run.checkpoint(&trainer, pos_now, &mut metrics)?;
        }
    }
    progress.finish();
    let names = run.class_names.clone();
    write_dir_atomic(&dir.root, "final", |tmp| {
        Ok(save_hf(&run.model, tmp, names.as_deref())?)
    })?;
    if let Err(e) = crate::cmd::plot::plot_run(&dir, &dir.curves()) {
        eprintln!("warning: could not draw curves.png: {e:#}");
    }
    let (top1, top5, test_loss) = match last_eval {
        Some(e) => e,
        None => run.evaluate(&test_loader)?,
    };
    Ok(Summary {
        out: dir.root.display().to_string(),
        steps: trainer.step(),
        top1,
        top5,
        test_loss,
        best_top1: run.best.top1,
        best_step: run.best.step,
        wall_s: started.elapsed().as_secs_f64(),
    })
}
