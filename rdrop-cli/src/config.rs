//! The run configuration of `rdrop train`: presets, TOML files and flags.
//!
//! Precedence: preset < `--config FILE` < flags. The resolved configuration is written to
//! `OUT/config.toml` before step 0, and `rdrop resume OUT` reads it back, so a run is fully
//! described by its folder. Presets:
//!
//! - `vit-b16-cifar100` (= [`RunConfig::default`]): ViT-B/16 from
//!   `google/vit-base-patch16-224-in21k` at 224 px, batch 512, SGD momentum 0.9, lr 8e-3,
//!   warm-up 500, cosine, 20000 steps, α 0.3, clip 1.0, weight decay 0, seed 42, eval every
//!   100: the setting an author of R-Drop (<https://arxiv.org/abs/2106.14448>) confirmed
//!   reproduces 93.29 top-1.
//! - `vit-src`: the reference code's defaults with 10000 steps: 384 px, lr 1e-2, micro-batch
//!   32 × 16, the `reference` loss, two sequential passes, f16 with loss scale 2^20.
//! - `demo`: the embedded digits archive, a tiny ViT from scratch on the CPU, a few minutes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rdrop_vit::ViTConfig;
use serde::{Deserialize, Serialize};

use crate::device::{DeviceSpec, Precision};

/// `data` value naming the embedded demo archive.
pub const BUILTIN_DEMO: &str = "builtin:digits";

/// Preset names accepted by `--preset`.
pub const PRESETS: &[&str] = &["demo", "vit-b16-cifar100", "vit-src"];

/// LR decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine from the base rate to 0 (the recipe).
    Cosine,
    /// Linear to 0.
    Linear,
}

/// Loss reduction convention (see `rdrop_core::loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossReduction {
    /// CE averaged, KL averaged over samples: independent of the micro-batch size.
    Mean,
    /// As the R-Drop ViT code: CE_p + CE_q + α Σ_samples KL (grows with the micro-batch).
    Reference,
}

/// How the two stochastic passes are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Passes {
    /// One forward of [x; x] (the paper).
    Concat,
    /// Two forwards (the reference code; less peak memory).
    Sequential,
}

/// Training-time augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AugmentKind {
    /// RandomResizedCrop(S, scale = crop_scale) + normalisation (the recipe).
    Recipe,
    /// The test transform (resize the whole image).
    None,
}

/// Optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum (PyTorch semantics; the recipe).
    Sgd,
    /// AdamW.
    Adamw,
}

/// Everything a training run needs. `Default` is the `vit-b16-cifar100` recipe.
///
/// Optional fields absent from a file are `None` (not the recipe's value), so that a written
/// `config.toml` reads back exactly; an empty string also means `None` (e.g. `weights = ""`
/// trains from scratch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// The preset this configuration started from (informational).
    pub preset: String,
    /// Dataset: a `cifar-100-python.tar.gz` / `cifar-10-python.tar.gz` or its extracted folder,
    /// or `builtin:digits` (the embedded demo).
    #[serde(default)]
    pub data: Option<String>,
    /// Initial weights (HF folder or hub id, timm file, npz, run folder); none = random init.
    #[serde(default)]
    pub weights: Option<String>,
    /// Architecture preset (rdrop-vit) for random init and for weight files without a config.
    #[serde(default)]
    pub model: Option<String>,
    /// Explicit architecture for random init (overrides `model`).
    #[serde(default)]
    pub vit: Option<ViTConfig>,
    /// Start from a new zero head even when the checkpoint's has the right size.
    pub reset_head: bool,
    /// LayerNorm epsilon override (the recipe: 1e-6).
    #[serde(default)]
    pub layer_norm_eps: Option<f64>,
    /// Number of optimiser updates.
    pub steps: u64,
    /// Images per update (= micro_batch × accumulation).
    pub batch_size: usize,
    /// Images per forward/backward.
    pub micro_batch: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Linear warm-up updates.
    pub warmup_steps: u64,
    /// Decay after warm-up.
    pub schedule: Schedule,
    /// Weight α of the symmetric KL.
    pub alpha: f64,
    /// Loss reduction convention.
    pub loss_reduction: LossReduction,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f64,
    /// One forward of [x; x] or two forwards.
    pub passes: Passes,
    /// Overrides every dropout rate of the model (hidden, attention, attention output).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Input side in pixels.
    pub image_size: usize,
    /// Training augmentation.
    pub augment: AugmentKind,
    /// RandomResizedCrop area range (the recipe: 0.05..1).
    pub crop_scale: [f64; 2],
    /// Shuffle the training split each epoch (`--no-shuffle`: file order).
    pub shuffle: bool,
    /// Global gradient-norm clipping threshold (0 = off).
    pub clip_grad_norm: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Forward precision (master weights are f32).
    pub precision: Precision,
    /// Initial dynamic loss scale (f16 only).
    pub loss_scale: f64,
    /// Device.
    pub device: DeviceSpec,
    /// Seed of data order, augmentation, initialisation and dropout.
    pub seed: u64,
    /// Evaluate on the test split every N updates (0 = never; the end of training always).
    pub eval_every: u64,
    /// Images per evaluation batch.
    pub eval_batch_size: usize,
    /// Checkpoint every N updates (0 = only at the end and on interruption).
    pub save_every: u64,
    /// Checkpoints kept (plus `best/`).
    pub keep_last: usize,
    /// CPU threads (None: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            preset: "vit-b16-cifar100".into(),
            data: None,
            weights: Some("google/vit-base-patch16-224-in21k".into()),
            model: Some("vit-b16".into()),
            vit: None,
            reset_head: false,
            layer_norm_eps: Some(1e-6),
            steps: 20_000,
            batch_size: 512,
            micro_batch: 64,
            lr: 8e-3,
            warmup_steps: 500,
            schedule: Schedule::Cosine,
            alpha: 0.3,
            loss_reduction: LossReduction::Mean,
            label_smoothing: 0.0,
            passes: Passes::Concat,
            dropout: Some(0.1),
            image_size: 224,
            augment: AugmentKind::Recipe,
            crop_scale: [0.05, 1.0],
            shuffle: true,
            clip_grad_norm: 1.0,
            weight_decay: 0.0,
            momentum: 0.9,
            optimizer: OptimizerKind::Sgd,
            precision: Precision::Bf16,
            loss_scale: 1_048_576.0,
            device: DeviceSpec::Cuda(0),
            seed: 42,
            eval_every: 100,
            eval_batch_size: 64,
            save_every: 500,
            keep_last: 3,
            threads: None,
        }
    }
}

impl RunConfig {
    /// A named preset (`demo`, `vit-b16-cifar100`, `vit-src`).
    pub fn preset(name: &str) -> anyhow::Result<Self> {
        let base = Self::default();
        Ok(match name {
            "vit-b16-cifar100" => base,
            "vit-src" => Self {
                preset: name.into(),
                image_size: 384,
                lr: 1e-2,
                steps: 10_000,
                micro_batch: 32,
                loss_reduction: LossReduction::Reference,
                passes: Passes::Sequential,
                precision: Precision::F16,
                ..base
            },
            "demo" => Self {
                preset: name.into(),
                data: Some(BUILTIN_DEMO.into()),
                weights: None,
                model: None,
                vit: Some(demo_vit()),
                layer_norm_eps: None,
                steps: 500,
                batch_size: 64,
                micro_batch: 64,
                lr: 3e-3,
                warmup_steps: 20,
                optimizer: OptimizerKind::Adamw,
                weight_decay: 0.05,
                dropout: None,
                image_size: 16,
                // The digits are centred and tiny: no random crops, so that a few hundred
                // updates suffice (R-Drop's KL term is the regulariser here).
                augment: AugmentKind::None,
                crop_scale: [0.6, 1.0],
                precision: Precision::F32,
                device: DeviceSpec::Cpu,
                eval_every: 100,
                eval_batch_size: 300,
                save_every: 250,
                keep_last: 2,
                // Matrices this small do not gain from a second thread, and candle's spinning
                // thread pool loses a lot when the cores are shared (measured: 2-3× slower).
                threads: Some(1),
                ..base
            },
            _ => anyhow::bail!(
                "unknown preset `{name}` (known presets: {})",
                PRESETS.join(", ")
            ),
        })
    }

    /// Reads a TOML file over `self` (fields in the file replace those of `self`; tables such
    /// as `[vit]` are merged key by key). Unknown keys are errors.
    pub fn merge_file(self, path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let file: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
        let mut base = toml::Table::try_from(&self).context("serialising the preset")?;
        merge_tables(&mut base, file);
        let c: Self = toml::Value::Table(base)
            .try_into()
            .with_context(|| format!("{}: invalid configuration", path.display()))?;
        Ok(c.normalise())
    }

    /// Loads a resolved `config.toml` (a run folder's).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let c: Self = toml::from_str(&text)
            .with_context(|| format!("{}: invalid configuration", path.display()))?;
        Ok(c.normalise())
    }

    /// The TOML text written to `OUT/config.toml`.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let body = toml::to_string_pretty(self).context("serialising the configuration")?;
        Ok(format!(
            "# rdrop run configuration (resolved: preset < config file < flags).\n\
             # Re-run with `rdrop train --config THIS_FILE`, continue with `rdrop resume OUT`.\n{body}"
        ))
    }

    /// Empty strings in optional text fields mean "none".
    fn normalise(mut self) -> Self {
        for f in [&mut self.data, &mut self.weights, &mut self.model] {
            if f.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *f = None;
            }
        }
        self
    }

    /// Gradient-accumulation steps (`batch_size / micro_batch`).
    pub fn accumulation(&self) -> usize {
        self.batch_size / self.micro_batch.max(1)
    }

    /// Checks the numbers before anything heavy starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.steps > 0, "steps must be at least 1");
        anyhow::ensure!(self.micro_batch > 0, "micro-batch must be at least 1");
        anyhow::ensure!(
            self.batch_size >= self.micro_batch && self.batch_size.is_multiple_of(self.micro_batch),
            "batch size {} must be a positive multiple of the micro-batch {}",
            self.batch_size,
            self.micro_batch
        );
        anyhow::ensure!(self.image_size > 0, "image size must be positive");
        anyhow::ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "lr must be positive, got {}",
            self.lr
        );
        anyhow::ensure!(
            self.alpha >= 0.0,
            "alpha must be non-negative, got {}",
            self.alpha
        );
        if let Some(p) = self.dropout {
            anyhow::ensure!(
                (0.0..1.0).contains(&p),
                "dropout must be in [0, 1), got {p}"
            );
        }
        let [lo, hi] = self.crop_scale;
        anyhow::ensure!(
            0.0 < lo && lo <= hi && hi <= 1.0,
            "crop_scale must satisfy 0 < min <= max <= 1, got [{lo}, {hi}]"
        );
        anyhow::ensure!(
            self.eval_batch_size > 0,
            "eval batch size must be at least 1"
        );
        anyhow::ensure!(self.keep_last > 0, "keep-last must be at least 1");
        anyhow::ensure!(
            self.data.is_some(),
            "no dataset: pass --data PATH (cifar-100-python.tar.gz or its folder; \
             `rdrop data download` fetches it) or use --preset demo"
        );
        self.precision.check(&self.device)?;
        Ok(())
    }
}

/// The demo's model: a tiny ViT for 16×16 digits (patch 4: 16 tokens + class token; D 96,
/// 2 blocks: in a sweep with timm on the same data it learnt faster than deeper/narrower ones).
fn demo_vit() -> ViTConfig {
    ViTConfig {
        image_size: 16,
        patch_size: 4,
        num_channels: 3,
        hidden_size: 96,
        num_layers: 2,
        num_heads: 4,
        mlp_dim: 192,
        num_classes: 10,
        dropout: 0.1,
        attention_dropout: 0.0,
        attention_output_dropout: 0.0,
        layer_norm_eps: 1e-6,
    }
}

fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Flags of `rdrop train` that override the preset and the config file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Overrides {
    /// Dataset: cifar-100-python.tar.gz (or cifar-10), its extracted folder, or builtin:digits.
    #[arg(long, value_name = "PATH")]
    pub data: Option<String>,
    /// Initial weights: HF folder or hub id, timm .safetensors, Google .npz, or a run folder.
    #[arg(long, value_name = "SPEC")]
    pub weights: Option<String>,
    /// Architecture preset for random init / weight files without config.json (vit-b16, cpu-small, ...).
    #[arg(long, value_name = "PRESET")]
    pub model: Option<String>,
    /// Optimiser updates.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per update (micro-batch × accumulation).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Images per forward/backward.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Base learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up updates.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// LR decay after warm-up.
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    /// Weight α of the symmetric KL (0: plain dropout training with two passes).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// `mean` (independent of the micro-batch) or `reference` (the R-Drop code's sum).
    #[arg(long, value_enum)]
    pub loss_reduction: Option<LossReduction>,
    /// One forward of [x; x] (`concat`) or two forwards (`sequential`).
    #[arg(long, value_enum)]
    pub passes: Option<Passes>,
    /// Overrides every dropout rate of the model.
    #[arg(long, value_name = "P")]
    pub dropout: Option<f64>,
    /// Input side in pixels.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// `recipe` (RandomResizedCrop) or `none` (train on the test transform).
    #[arg(long, value_enum)]
    pub augment: Option<AugmentKind>,
    /// Take the train split in file order (no shuffling).
    #[arg(long)]
    pub no_shuffle: bool,
    /// Global gradient-norm clipping threshold (0 = off).
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// SGD momentum.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// `sgd` (momentum; the recipe) or `adamw`.
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Forward precision: f32, bf16 or f16 (bf16/f16 on CUDA).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Seed of data order, augmentation, init and dropout.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate every N updates (0 = only at the end).
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Checkpoint every N updates (0 = only at the end / on interruption).
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Checkpoints to keep (plus best/).
    #[arg(long, value_name = "K")]
    pub keep_last: Option<usize>,
    /// CPU threads.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Overrides {
    /// Applies the flags that were given.
    pub fn apply(&self, mut c: RunConfig) -> RunConfig {
        macro_rules! set {
            ($($f:ident),*) => {$( if let Some(v) = self.$f.clone() { c.$f = v; } )*};
        }
        set!(
            steps,
            batch_size,
            micro_batch,
            lr,
            warmup_steps,
            schedule,
            alpha,
            loss_reduction,
            passes,
            image_size,
            augment,
            clip_grad_norm,
            weight_decay,
            momentum,
            optimizer,
            precision,
            device,
            seed,
            eval_every,
            save_every,
            keep_last
        );
        if let Some(d) = &self.data {
            c.data = Some(d.clone());
        }
        if let Some(w) = &self.weights {
            c.weights = Some(w.clone());
        }
        if let Some(m) = &self.model {
            c.model = Some(m.clone());
            c.vit = None;
        }
        if let Some(p) = self.dropout {
            c.dropout = Some(p);
        }
        if let Some(t) = self.threads {
            c.threads = Some(t);
        }
        if self.no_shuffle {
            c.shuffle = false;
        }
        // A batch smaller than the preset's micro-batch means "no accumulation".
        if self.batch_size.is_some() && self.micro_batch.is_none() && c.micro_batch > c.batch_size {
            c.micro_batch = c.batch_size;
        }
        c
    }
}

/// Resolves preset < config file < flags. The preset comes from `--preset`, else from the
/// file's `preset` key, else the default recipe.
pub fn resolve(
    preset: Option<&str>,
    file: Option<&Path>,
    flags: &Overrides,
) -> anyhow::Result<RunConfig> {
    let file_preset = match file {
        Some(p) if preset.is_none() => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            let t: toml::Table = toml::from_str(&text)
                .with_context(|| format!("{}: not valid TOML", p.display()))?;
            t.get("preset").and_then(|v| v.as_str()).map(str::to_string)
        }
        _ => None,
    };
    let name = preset
        .map(str::to_string)
        .or(file_preset)
        .unwrap_or_else(|| "vit-b16-cifar100".into());
    let mut c = RunConfig::preset(&name)?;
    if let Some(f) = file {
        c = c.merge_file(f)?;
        c.preset = name;
    }
    Ok(flags.apply(c))
}

/// `runs/<preset>-<UTC yyyymmdd-hhmmss>`.
pub fn default_out_dir(preset: &str) -> PathBuf {
    PathBuf::from("runs").join(format!("{preset}-{}", utc_stamp()))
}

/// The current UTC time as `yyyymmdd-hhmmss` (civil-from-days, no time-zone crate needed).
pub fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_issue() {
        let b = RunConfig::preset("vit-b16-cifar100").unwrap();
        assert_eq!(b, RunConfig::default());
        assert_eq!(
            b.weights.as_deref(),
            Some("google/vit-base-patch16-224-in21k")
        );
        assert_eq!(
            (b.image_size, b.batch_size, b.steps, b.warmup_steps),
            (224, 512, 20_000, 500)
        );
        assert_eq!(
            (b.lr, b.momentum, b.alpha, b.clip_grad_norm, b.weight_decay),
            (8e-3, 0.9, 0.3, 1.0, 0.0)
        );
        assert_eq!(
            (b.seed, b.eval_every, b.optimizer, b.schedule),
            (42, 100, OptimizerKind::Sgd, Schedule::Cosine)
        );
        let s = RunConfig::preset("vit-src").unwrap();
        assert_eq!(
            (s.image_size, s.lr, s.micro_batch, s.steps),
            (384, 1e-2, 32, 10_000)
        );
        assert_eq!(s.loss_reduction, LossReduction::Reference);
        assert_eq!(s.accumulation(), 16);
        let d = RunConfig::preset("demo").unwrap();
        assert_eq!(d.data.as_deref(), Some(BUILTIN_DEMO));
        d.validate().unwrap();
        let e = RunConfig::preset("nope").unwrap_err().to_string();
        assert!(
            e.contains("unknown preset `nope`") && e.contains("demo"),
            "{e}"
        );
    }

    #[test]
    fn precedence_preset_file_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "preset = \"demo\"\nlr = 0.5\nsteps = 7\n[vit]\nnum_layers = 1\n",
        )
        .unwrap();
        let flags = Overrides {
            steps: Some(9),
            no_shuffle: true,
            ..Default::default()
        };
        let c = resolve(None, Some(&f), &flags).unwrap();
        assert_eq!(c.preset, "demo"); // preset from the file
        assert_eq!(c.weights, None); // the demo's "no weights" survives the merge
        assert_eq!(c.lr, 0.5); // file over preset
        assert_eq!(c.steps, 9); // flag over file
        assert!(!c.shuffle);
        let vit = c.vit.clone().unwrap();
        assert_eq!((vit.num_layers, vit.hidden_size), (1, 96)); // table merged key by key
                                                                // round trip through the written config.toml
        let back: RunConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(back, c);
        // --preset beats the file's preset key
        let c2 = resolve(Some("vit-src"), Some(&f), &Overrides::default()).unwrap();
        assert_eq!(
            (c2.preset.as_str(), c2.image_size, c2.lr),
            ("vit-src", 384, 0.5)
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "lrr = 0.5\n").unwrap();
        let e = format!(
            "{:#}",
            resolve(Some("demo"), Some(&f), &Overrides::default()).unwrap_err()
        );
        assert!(e.contains("lrr"), "{e}");
        let mut c = RunConfig::preset("demo").unwrap();
        c.batch_size = 100;
        c.micro_batch = 64;
        assert!(c.validate().unwrap_err().to_string().contains("multiple"));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }
}
