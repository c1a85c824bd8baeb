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
//!
//! Every preset has the reference's dropout (ViT-B_16 in ViT-pytorch): 0.1 after the position
//! embeddings and after both MLP linears, 0.0 on the attention probabilities and after the
//! attention output projection. `dropout` / `--dropout` set the first rate,
//! `attention_dropout` / `--attention-dropout` the other two (the reference's single
//! attention rate); the `[vit]` table holds all three apart. `rdrop train --dry-run` prints the
//! resolved configuration.

use std::path::{Path, PathBuf};

use anyhow::Context;
pub use rdrop_core::{DecayKind, LossMode, OptimizerKind};
use rdrop_core::{LossConfig, OptimConfig, ScalerConfig, ScheduleConfig, TrainConfig};
use rdrop_vit::ViTConfig;
use serde::{Deserialize, Serialize};

use crate::device::{check_precision, DeviceSpec, EngineKind, PrecisionSetting};

/// `data` value naming the embedded demo archive.
pub const BUILTIN_DEMO: &str = "builtin:digits";

/// Preset names accepted by `--preset`.
pub const PRESETS: &[&str] = &["demo", "vit-b16-cifar100", "vit-src"];

/// How the two stochastic passes are run (rdrop-core's enum, a clap value through its
/// `clap` feature).
pub use rdrop_core::TwoPass as Passes;

/// `micro_batch`: a number of images per forward/backward, or `auto`: on CUDA with the
/// explicit engine the largest divisor of the per-rank batch whose activation plan fits the
/// GPU's free memory with a margin (`rdrop_vit::engine::cuda::fit`), decided when the run
/// opens the device; elsewhere the largest divisor not above 64. `config.toml` records the number chosen, and a run
/// continued with `auto` keeps it (the data order depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicroBatch {
    /// Decided for the device.
    Auto,
    /// This many images.
    Fixed(usize),
}

impl MicroBatch {
    /// The number, `None` for `auto`.
    pub fn fixed(self) -> Option<usize> {
        match self {
            Self::Auto => None,
            Self::Fixed(n) => Some(n),
        }
    }
}

impl std::fmt::Display for MicroBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for MicroBatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        s.parse::<usize>()
            .map(Self::Fixed)
            .map_err(|_| format!("`{s}` is neither a number of images nor `auto`"))
    }
}

impl Serialize for MicroBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for MicroBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Self::Fixed(n as usize)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
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

/// The `[vit]` table: the model's three dropout rates and, for random init, its architecture.
///
/// The rates always apply (to pre-trained weights too: their `config.json` rates are
/// replaced). The architecture fields are filled only when they decide the model, i.e. when
/// there are no `weights`; with weights, the weights' `config.json` (or, for files without
/// one, `model`) decides, and the fields are absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VitTable {
    /// Dropout after adding the position embeddings and after each MLP linear (recipe 0.1).
    pub dropout: f64,
    /// Dropout on the attention probabilities (recipe 0.0).
    pub attention_dropout: f64,
    /// Dropout after the attention output projection (recipe 0.0: the reference uses the
    /// attention rate here).
    pub attention_output_dropout: f64,
    /// Patch side in pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_size: Option<usize>,
    /// Input channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_channels: Option<usize>,
    /// Token width D.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    /// Transformer blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_layers: Option<usize>,
    /// Attention heads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_heads: Option<usize>,
    /// MLP hidden width.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp_dim: Option<usize>,
    /// Read from older `config.toml` files (which held a whole `ViTConfig`) and ignored: the
    /// top-level `image_size`, `layer_norm_eps` and the dataset's classes decide these.
    #[serde(skip_serializing)]
    pub image_size: Option<usize>,
    /// Ignored, as `image_size`.
    #[serde(skip_serializing)]
    pub num_classes: Option<usize>,
    /// Ignored, as `image_size`.
    #[serde(skip_serializing)]
    pub layer_norm_eps: Option<f64>,
}

impl Default for VitTable {
    /// The recipe's rates (ViT-B_16 in ViT-pytorch: dropout 0.1, attention 0.0 for both the
    /// probabilities and the output projection), no architecture.
    fn default() -> Self {
        Self {
            dropout: 0.1,
            attention_dropout: 0.0,
            attention_output_dropout: 0.0,
            patch_size: None,
            num_channels: None,
            hidden_size: None,
            num_layers: None,
            num_heads: None,
            mlp_dim: None,
            image_size: None,
            num_classes: None,
            layer_norm_eps: None,
        }
    }
}

impl From<&ViTConfig> for VitTable {
    fn from(v: &ViTConfig) -> Self {
        let mut t = Self {
            dropout: v.dropout,
            attention_dropout: v.attention_dropout,
            attention_output_dropout: v.attention_output_dropout,
            ..Self::default()
        };
        t.fill_architecture(v);
        t
    }
}

impl VitTable {
    fn arch_fields(&mut self) -> [(&'static str, &mut Option<usize>); 6] {
        [
            ("patch_size", &mut self.patch_size),
            ("num_channels", &mut self.num_channels),
            ("hidden_size", &mut self.hidden_size),
            ("num_layers", &mut self.num_layers),
            ("num_heads", &mut self.num_heads),
            ("mlp_dim", &mut self.mlp_dim),
        ]
    }

    /// Sets the architecture fields that are still absent from `v`.
    pub fn fill_architecture(&mut self, v: &ViTConfig) {
        let vals = [
            v.patch_size,
            v.num_channels,
            v.hidden_size,
            v.num_layers,
            v.num_heads,
            v.mlp_dim,
        ];
        for ((_, f), x) in self.arch_fields().into_iter().zip(vals) {
            f.get_or_insert(x);
        }
    }

    /// Removes the architecture (the weights or a new `--model` decide it).
    pub fn clear_architecture(&mut self) {
        for (_, f) in self.arch_fields() {
            *f = None;
        }
        (self.image_size, self.num_classes, self.layer_norm_eps) = (None, None, None);
    }

    /// Names of the architecture fields that are set, and of those that are not.
    fn arch_presence(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut t = self.clone();
        let (mut set, mut unset) = (Vec::new(), Vec::new());
        for (n, f) in t.arch_fields() {
            if f.is_some() {
                set.push(n);
            } else {
                unset.push(n);
            }
        }
        (set, unset)
    }

    /// The whole model configuration for random init, when every architecture field is set.
    pub fn architecture(
        &self,
        image_size: usize,
        num_classes: usize,
        layer_norm_eps: Option<f64>,
    ) -> Option<ViTConfig> {
        let base = ViTConfig::default();
        Some(ViTConfig {
            image_size,
            patch_size: self.patch_size?,
            num_channels: self.num_channels?,
            hidden_size: self.hidden_size?,
            num_layers: self.num_layers?,
            num_heads: self.num_heads?,
            mlp_dim: self.mlp_dim?,
            num_classes,
            dropout: self.dropout,
            attention_dropout: self.attention_dropout,
            attention_output_dropout: self.attention_output_dropout,
            layer_norm_eps: layer_norm_eps.unwrap_or(base.layer_norm_eps),
        })
    }
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
    /// Architecture preset (rdrop-vit) for random init and for weight files without a
    /// `config.json` (timm, npz). A weights' `config.json` decides the architecture; only an
    /// explicit `--model` must then agree with it.
    #[serde(default)]
    pub model: Option<String>,
    /// The model's dropout rates and, for random init, its architecture (`[vit]`).
    pub vit: VitTable,
    /// Start from a new zero head even when the checkpoint's has the right size.
    pub reset_head: bool,
    /// LayerNorm epsilon override (the recipe: 1e-6).
    #[serde(default)]
    pub layer_norm_eps: Option<f64>,
    /// Number of optimiser updates.
    pub steps: u64,
    /// Images per update (= micro_batch × accumulation).
    pub batch_size: usize,
    /// Images per forward/backward, or `auto` ([`MicroBatch`]).
    pub micro_batch: MicroBatch,
    /// Base learning rate.
    pub lr: f64,
    /// Linear warm-up updates.
    pub warmup_steps: u64,
    /// Decay after warm-up.
    pub schedule: DecayKind,
    /// Weight α of the symmetric KL.
    pub alpha: f64,
    /// Loss reduction convention.
    pub loss_reduction: LossMode,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f64,
    /// One forward of [x; x] or two forwards.
    pub passes: Passes,
    /// Shortcut for `[vit] dropout` (the hidden rate: embeddings and MLP outputs). Folded into
    /// `[vit]` on resolution, so a written `config.toml` never has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// Shortcut for both `[vit] attention_dropout` and `attention_output_dropout` (the
    /// reference's single `attention_dropout_rate`). Folded into `[vit]` on resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_dropout: Option<f64>,
    /// Train on the first N images of the training split only (file order); none = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_images: Option<usize>,
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
    /// Forward precision (master weights are f32): `auto` (f32 on the CPU; on CUDA bf16 from
    /// compute capability 8.0, f16 with loss scaling below) or fixed.
    pub precision: PrecisionSetting,
    /// `auto` (the explicit engine on CPU in f32 and on CUDA, else autograd), `explicit` or `autograd`.
    pub engine: EngineKind,
    /// Initial dynamic loss scale (f16 only).
    pub loss_scale: f64,
    /// Data parallel (explicit engine): the gradients are summed over the ranks in buckets of
    /// at least this many MiB of whole blocks, each as soon as the last backward has finished
    /// it, overlapped with the rest; 0 = one all-reduce after the backward.
    pub grad_bucket_mb: f64,
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
    /// Also checkpoint when this many minutes have passed since the last checkpoint (0 = off),
    /// so that a preemption loses at most that much work whatever the step rate.
    #[serde(default)]
    pub save_every_minutes: f64,
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
            vit: VitTable::default(),
            reset_head: false,
            layer_norm_eps: Some(1e-6),
            steps: 20_000,
            batch_size: 512,
            micro_batch: MicroBatch::Auto,
            lr: 8e-3,
            warmup_steps: 500,
            schedule: DecayKind::Cosine,
            alpha: 0.3,
            loss_reduction: LossMode::Mean,
            label_smoothing: 0.0,
            passes: Passes::Concat,
            dropout: None,
            attention_dropout: None,
            train_images: None,
            image_size: 224,
            augment: AugmentKind::Recipe,
            crop_scale: [0.05, 1.0],
            shuffle: true,
            clip_grad_norm: 1.0,
            weight_decay: 0.0,
            momentum: 0.9,
            optimizer: OptimizerKind::Sgd,
            precision: PrecisionSetting::Auto,
            engine: EngineKind::Auto,
            loss_scale: 1_048_576.0,
            grad_bucket_mb: 25.0,
            device: DeviceSpec::Cuda(0),
            seed: 42,
            eval_every: 100,
            eval_batch_size: 64,
            save_every: 500,
            save_every_minutes: 0.0,
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
                // The reference loss's KL scale depends on the micro-batch: fixed, as there.
                micro_batch: MicroBatch::Fixed(32),
                loss_reduction: LossMode::Reference,
                passes: Passes::Sequential,
                precision: PrecisionSetting::F16,
                ..base
            },
            "demo" => Self {
                preset: name.into(),
                data: Some(BUILTIN_DEMO.into()),
                weights: None,
                model: None,
                vit: VitTable::from(&demo_vit()),
                layer_norm_eps: None,
                steps: 500,
                batch_size: 64,
                micro_batch: MicroBatch::Fixed(64),
                lr: 3e-3,
                warmup_steps: 20,
                optimizer: OptimizerKind::AdamW,
                weight_decay: 0.05,
                image_size: 16,
                // The digits are centred and tiny: no random crops, so that a few hundred
                // updates suffice (R-Drop's KL term is the regulariser here).
                augment: AugmentKind::None,
                crop_scale: [0.6, 1.0],
                precision: PrecisionSetting::F32,
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

    /// Reads a TOML file over `self` ([`RunConfig::merge`]).
    pub fn merge_file(self, path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let file: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
        self.merge(file)
            .with_context(|| format!("{}: invalid configuration", path.display()))
    }

    /// One layer of settings over `self`: the keys of `over` replace those of `self`, tables
    /// such as `[vit]` are merged key by key. Unknown keys are errors.
    pub fn merge(self, over: toml::Table) -> anyhow::Result<Self> {
        let mut base = toml::Table::try_from(&self).context("serialising the configuration")?;
        merge_tables(&mut base, over);
        let c: Self = toml::Value::Table(base).try_into()?;
        Ok(c.normalise())
    }

    /// Folds the `dropout` / `attention_dropout` shortcuts into `[vit]`, and makes `[vit]`'s
    /// architecture say what decides the model: none with weights, else `model`'s preset
    /// under any fields set explicitly. Idempotent, so a written `config.toml` reads back
    /// unchanged.
    pub fn finish(mut self) -> anyhow::Result<Self> {
        if let Some(p) = self.dropout.take() {
            self.vit.dropout = p;
        }
        if let Some(p) = self.attention_dropout.take() {
            self.vit.attention_dropout = p;
            self.vit.attention_output_dropout = p;
        }
        if self.weights.is_some() {
            self.vit.clear_architecture();
        } else if let Some(m) = &self.model {
            let preset = ViTConfig::preset(m).with_context(|| format!("model `{m}`"))?;
            self.vit.fill_architecture(&preset);
        }
        Ok(self)
    }

    /// Loads a resolved `config.toml` (a run folder's).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::load_str(&text).with_context(|| format!("{}", path.display()))
    }

    /// Parses a resolved configuration's TOML text (as [`RunConfig::load`], from memory).
    pub fn load_str(text: &str) -> anyhow::Result<Self> {
        let c: Self = toml::from_str(text).context("invalid configuration")?;
        c.normalise().finish()
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

    /// The precision the run computes in: the fixed setting (`rdrop train` fixes `auto` for
    /// the GPU when it opens the device, [`PrecisionSetting::resolve`]); before that, `auto`
    /// is taken as f32 on the CPU and bf16 on CUDA.
    pub fn compute_precision(&self) -> crate::device::Precision {
        self.precision.assumed(&self.device)
    }

    /// Images per forward/backward: the number set or chosen (`rdrop train` fixes `auto` when
    /// it opens the device); for `auto` before that, the whole batch.
    pub fn micro(&self) -> usize {
        self.micro_batch.fixed().unwrap_or(self.batch_size).max(1)
    }

    /// Gradient-accumulation steps (`batch_size / micro_batch`).
    pub fn accumulation(&self) -> usize {
        self.batch_size / self.micro()
    }

    /// The rdrop-core update configuration of the run.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            loss: LossConfig {
                alpha: self.alpha,
                mode: self.loss_reduction,
                label_smoothing: self.label_smoothing,
            },
            optim: OptimConfig {
                kind: self.optimizer,
                lr: self.lr,
                momentum: if self.optimizer == OptimizerKind::Sgd {
                    self.momentum
                } else {
                    0.0
                },
                weight_decay: self.weight_decay,
                ..OptimConfig::default()
            },
            schedule: ScheduleConfig {
                decay: self.schedule,
                warmup_steps: self.warmup_steps,
                total_steps: self.steps,
                cycles: 0.5,
            },
            clip_norm: (self.clip_grad_norm > 0.0).then_some(self.clip_grad_norm),
            accum_steps: self.accumulation(),
            micro_batch: self.micro(),
            two_pass: self.passes,
            precision: self.compute_precision(),
            scaler: ScalerConfig {
                init_scale: self.loss_scale,
                ..ScalerConfig::default()
            },
            sync_timing: false,
            grad_bucket_mb: self.grad_bucket_mb,
        }
    }

    /// Checks the numbers before anything heavy starts, and that there is a dataset.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_settings()?;
        anyhow::ensure!(
            self.data.is_some(),
            "no dataset: pass --data PATH (cifar-100-python.tar.gz or its folder; \
             `rdrop data download` fetches it) or use --preset demo"
        );
        Ok(())
    }

    /// Checks every setting except the presence of a dataset (what `--dry-run` checks).
    pub fn validate_settings(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.steps > 0, "steps must be at least 1");
        anyhow::ensure!(self.batch_size > 0, "batch size must be at least 1");
        anyhow::ensure!(
            !(self.micro_batch == MicroBatch::Auto && self.loss_reduction == LossMode::Reference),
            "micro_batch = auto with loss_reduction = reference: the reference loss's KL term \
             scales with the micro-batch, so the objective would depend on the GPU; give \
             --micro-batch N (or use loss_reduction = mean, which does not depend on it)"
        );
        if let MicroBatch::Fixed(m) = self.micro_batch {
            anyhow::ensure!(m > 0, "micro-batch must be at least 1");
            anyhow::ensure!(
                self.batch_size >= m && self.batch_size.is_multiple_of(m),
                "batch size {} must be a positive multiple of the micro-batch {m}",
                self.batch_size,
            );
        }
        anyhow::ensure!(self.image_size > 0, "image size must be positive");
        anyhow::ensure!(
            self.train_images != Some(0),
            "train_images must be at least 1"
        );
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
        for (name, p) in [
            ("dropout", Some(self.vit.dropout)),
            ("attention_dropout", Some(self.vit.attention_dropout)),
            (
                "attention_output_dropout",
                Some(self.vit.attention_output_dropout),
            ),
            ("dropout", self.dropout),
            ("attention_dropout", self.attention_dropout),
        ] {
            if let Some(p) = p {
                anyhow::ensure!((0.0..1.0).contains(&p), "{name} must be in [0, 1), got {p}");
            }
        }
        let (set, unset) = self.vit.arch_presence();
        if self.weights.is_none() && set.is_empty() {
            anyhow::bail!(
                "no weights and no architecture: pass --weights SPEC, or --model PRESET (e.g. \
                 vit-b16) to train from scratch"
            );
        }
        if self.weights.is_none() && !unset.is_empty() {
            anyhow::bail!(
                "[vit] sets {} but not {}: give the whole architecture, or a `model` preset to \
                 fill the rest",
                set.join(", "),
                unset.join(", ")
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
            self.save_every_minutes.is_finite() && self.save_every_minutes >= 0.0,
            "save-every-minutes must be a number of minutes ≥ 0 (0 = off), not {}",
            self.save_every_minutes
        );
        let assumed = self.precision.assumed(&self.device);
        check_precision(assumed, &self.device)?;
        crate::device::use_explicit(self.engine, &self.device, assumed)?;
        // rdrop-core's own checks of the update (clipping, bucket size, loss scale, …), before
        // anything is created rather than when the trainer is built.
        self.train_config()
            .validate()
            .context("invalid training configuration")?;
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

/// Flags of `rdrop train` that override the preset and the config file. Each is the
/// [`RunConfig`] key of its name, so that a new setting is a field there and a flag here.
#[derive(clap::Args, Serialize, Debug, Clone, Default)]
pub struct Overrides {
    /// Dataset: cifar-100-python.tar.gz (or cifar-10), its extracted folder, or builtin:digits.
    #[arg(long, value_name = "PATH")]
    pub data: Option<String>,
    /// Initial weights: HF folder or hub id, timm .safetensors, Google .npz, or a run folder.
    #[arg(long, value_name = "SPEC")]
    pub weights: Option<String>,
    /// Architecture preset (vit-b16, cpu-small, ...) for random init and weight files without
    /// config.json; weights with a config.json must match it (their config.json decides).
    #[arg(long, value_name = "PRESET")]
    pub model: Option<String>,
    /// Optimiser updates.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per update (ranks × micro-batch × accumulation).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Images per forward/backward, or `auto`: on CUDA with the explicit engine the largest
    /// divisor of the per-rank batch whose activation plan fits the GPU's free memory (less
    /// max(1/16, 512 MiB)), computed from the plan's formula before anything is allocated;
    /// elsewhere the largest divisor not above 64. vit-b16-cifar100's default.
    #[arg(long, value_name = "N|auto")]
    pub micro_batch: Option<MicroBatch>,
    /// Base learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up updates.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// LR decay after warm-up.
    #[arg(long, value_enum)]
    pub schedule: Option<DecayKind>,
    /// Weight α of the symmetric KL (0: plain dropout training with two passes).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// `mean` (independent of the micro-batch) or `reference` (the R-Drop code's sum).
    #[arg(long, value_enum)]
    pub loss_reduction: Option<LossMode>,
    /// One forward of [x; x] (`concat`) or two forwards (`sequential`).
    #[arg(long, value_enum)]
    pub passes: Option<Passes>,
    /// Hidden dropout (after the position embeddings and the MLP linears; recipe 0.1).
    #[arg(long, value_name = "P")]
    pub dropout: Option<f64>,
    /// Attention dropout: probabilities and output projection (recipe 0.0).
    #[arg(long, value_name = "P")]
    pub attention_dropout: Option<f64>,
    /// Train on the first N training images only (file order).
    #[arg(long, value_name = "N")]
    pub train_images: Option<usize>,
    /// Input side in pixels.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// `recipe` (RandomResizedCrop) or `none` (train on the test transform).
    #[arg(long, value_enum)]
    pub augment: Option<AugmentKind>,
    /// Take the train split in file order (no shuffling).
    #[arg(long)]
    #[serde(
        rename = "shuffle",
        serialize_with = "shuffle_key",
        skip_serializing_if = "is_false"
    )]
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
    /// Forward precision: auto (vit-b16-cifar100's default: f32 on the CPU; on CUDA bf16 from
    /// compute capability 8.0, f16 with dynamic loss scaling below), f32, bf16 or f16.
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionSetting>,
    /// `explicit` (hand-written forward/backward: the CPU in f32, CUDA at every precision),
    /// `autograd` (the candle model: any device and precision) or `auto` (explicit where it
    /// runs, else autograd).
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    /// Data parallel with the explicit engine: sum the gradients over the ranks in buckets of
    /// at least this many MiB (whole blocks), each as soon as the backward has finished it,
    /// overlapped with the rest of the backward; 0 = one all-reduce after the backward (as
    /// autograd always does). Default 25. Every rank must use
    /// the same value (launchers pass every rank the same command line).
    #[arg(long, value_name = "MIB")]
    pub grad_bucket_mb: Option<f64>,
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
    /// Also checkpoint when M minutes have passed since the last checkpoint (0 = off): a
    /// preemption then loses at most M minutes, whatever the step rate.
    #[arg(long, value_name = "M")]
    pub save_every_minutes: Option<f64>,
    /// Checkpoints to keep (plus best/).
    #[arg(long, value_name = "K")]
    pub keep_last: Option<usize>,
    /// CPU threads.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Overrides {
    /// Applies the flags that were given: one more layer of settings ([`RunConfig::merge`]),
    /// each flag the key of its name (`--no-shuffle`: `shuffle = false`). A new `--model`
    /// replaces the architecture that the preset or the file gave.
    pub fn apply(&self, mut c: RunConfig) -> anyhow::Result<RunConfig> {
        if self.model.is_some() {
            c.vit.clear_architecture();
        }
        // Flags not given are `None`, which TOML leaves out.
        let layer = toml::Table::try_from(self).context("serialising the flags")?;
        let mut c = c.merge(layer).context("invalid flags")?;
        // A batch smaller than the preset's micro-batch means "no accumulation".
        if let (Some(_), None, MicroBatch::Fixed(m)) =
            (self.batch_size, self.micro_batch, c.micro_batch)
        {
            if m > c.batch_size {
                c.micro_batch = MicroBatch::Fixed(c.batch_size);
            }
        }
        Ok(c)
    }
}

/// `--no-shuffle` as the `shuffle` key.
fn shuffle_key<S: serde::Serializer>(no_shuffle: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bool(!no_shuffle)
}

fn is_false(b: &bool) -> bool {
    !b
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
    flags.apply(c)?.finish()
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
            (42, 100, OptimizerKind::Sgd, DecayKind::Cosine)
        );
        let s = RunConfig::preset("vit-src").unwrap();
        assert_eq!(
            (s.image_size, s.lr, s.micro_batch, s.steps),
            (384, 1e-2, MicroBatch::Fixed(32), 10_000)
        );
        // The GPU presets choose their micro-batch for the GPU; the reference loss cannot.
        assert_eq!(b.micro_batch, MicroBatch::Auto);
        let mut r = b.clone();
        r.loss_reduction = LossMode::Reference;
        let e = r.validate_settings().unwrap_err().to_string();
        assert!(e.contains("auto") && e.contains("--micro-batch N"), "{e}");
        for (text, want) in [("auto", MicroBatch::Auto), ("48", MicroBatch::Fixed(48))] {
            let m: MicroBatch = text.parse().unwrap();
            assert_eq!(m, want);
            assert_eq!(m.to_string(), text);
        }
        assert!("4x".parse::<MicroBatch>().is_err());
        assert_eq!(s.loss_reduction, LossMode::Reference);
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
        let vit = c.vit.clone();
        assert_eq!((vit.num_layers, vit.hidden_size), (Some(1), Some(96))); // table merged key by key
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
        c.micro_batch = MicroBatch::Fixed(64);
        assert!(c.validate().unwrap_err().to_string().contains("multiple"));
    }

    /// Each preset's rates are the recipe's (recipe.md, "Model"): 0.1 after the position
    /// embeddings and the MLP linears, 0.0 on the attention probabilities, and the attention
    /// rate (0.0) after the attention output projection.
    #[test]
    fn presets_have_the_recipe_dropouts() {
        for name in PRESETS {
            let c = resolve(Some(name), None, &Overrides::default()).unwrap();
            assert_eq!(
                (
                    c.vit.dropout,
                    c.vit.attention_dropout,
                    c.vit.attention_output_dropout
                ),
                (0.1, 0.0, 0.0),
                "preset {name}"
            );
            assert_eq!((c.dropout, c.attention_dropout), (None, None), "{name}");
            let back = RunConfig::load_str(&c.to_toml().unwrap()).unwrap();
            assert_eq!(back, c, "{name}: config.toml reads back");
        }
        // The random-init model gets the same rates.
        let d = resolve(Some("demo"), None, &Overrides::default()).unwrap();
        let v = d.vit.architecture(16, 10, None).unwrap();
        assert_eq!(
            (v.dropout, v.attention_dropout, v.attention_output_dropout),
            (0.1, 0.0, 0.0)
        );
    }

    #[test]
    fn dropout_flags_and_file_keys() {
        // --dropout sets the hidden rate only; --attention-dropout both attention rates.
        let flags = Overrides {
            dropout: Some(0.2),
            attention_dropout: Some(0.05),
            ..Default::default()
        };
        let c = resolve(None, None, &flags).unwrap();
        assert_eq!(
            (
                c.vit.dropout,
                c.vit.attention_dropout,
                c.vit.attention_output_dropout
            ),
            (0.2, 0.05, 0.05)
        );
        let c = resolve(
            None,
            None,
            &Overrides {
                dropout: Some(0.3),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (c.vit.attention_dropout, c.vit.attention_output_dropout),
            (0.0, 0.0)
        );
        // A file may set all three apart, and its shortcut keys as the flags do.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[vit]\ndropout = 0.15\nattention_dropout = 0.02\nattention_output_dropout = 0.04\n",
        )
        .unwrap();
        let c = resolve(None, Some(&f), &Overrides::default()).unwrap();
        assert_eq!(
            (
                c.vit.dropout,
                c.vit.attention_dropout,
                c.vit.attention_output_dropout
            ),
            (0.15, 0.02, 0.04)
        );
        std::fs::write(&f, "dropout = 0.25\nattention_dropout = 0.01\n").unwrap();
        let c = resolve(None, Some(&f), &Overrides::default()).unwrap();
        assert_eq!(
            (
                c.vit.dropout,
                c.vit.attention_dropout,
                c.vit.attention_output_dropout
            ),
            (0.25, 0.01, 0.01)
        );
        let mut bad = c.clone();
        bad.vit.attention_output_dropout = 1.0;
        bad.data = Some("x".into());
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("attention_output_dropout"), "{e}");
    }

    /// Every flag is the key of its name: given all at once, each lands in the configuration.
    #[test]
    fn every_flag_lands_on_its_key() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            flags: Overrides,
        }
        let line = "rdrop --data d --weights w --model vit-s16 --steps 11 --batch-size 48 \
                    --micro-batch 16 --lr 0.02 --warmup-steps 3 --schedule linear --alpha 0.7 \
                    --loss-reduction reference --passes sequential --dropout 0.2 \
                    --attention-dropout 0.03 --train-images 100 --image-size 32 --augment none \
                    --no-shuffle --clip-grad-norm 2.5 --weight-decay 0.01 --momentum 0.8 \
                    --optimizer adamw --precision f32 --engine explicit --grad-bucket-mb 7.5 \
                    --device cpu --seed 5 --eval-every 4 --save-every 6 \
                    --save-every-minutes 1.5 --keep-last 4 --threads 2";
        let cli = <Cli as clap::Parser>::try_parse_from(line.split_whitespace()).unwrap();
        let got = cli.flags.apply(RunConfig::default()).unwrap();
        let want = RunConfig {
            data: Some("d".into()),
            weights: Some("w".into()),
            model: Some("vit-s16".into()),
            steps: 11,
            batch_size: 48,
            micro_batch: MicroBatch::Fixed(16),
            lr: 0.02,
            warmup_steps: 3,
            schedule: DecayKind::Linear,
            alpha: 0.7,
            loss_reduction: LossMode::Reference,
            passes: Passes::Sequential,
            dropout: Some(0.2),
            attention_dropout: Some(0.03),
            train_images: Some(100),
            image_size: 32,
            augment: AugmentKind::None,
            shuffle: false,
            clip_grad_norm: 2.5,
            weight_decay: 0.01,
            momentum: 0.8,
            optimizer: OptimizerKind::AdamW,
            precision: PrecisionSetting::F32,
            engine: EngineKind::Explicit,
            grad_bucket_mb: 7.5,
            device: DeviceSpec::Cpu,
            seed: 5,
            eval_every: 4,
            save_every: 6,
            save_every_minutes: 1.5,
            keep_last: 4,
            threads: Some(2),
            ..RunConfig::default()
        };
        assert_eq!(got, want);
        // No flag, no change.
        let none = Overrides::default().apply(RunConfig::default()).unwrap();
        assert_eq!(none, RunConfig::default());
    }

    #[test]
    fn architecture_only_where_it_decides_the_model() {
        // Weights: config.json decides, so [vit] has no architecture.
        let c = resolve(None, None, &Overrides::default()).unwrap();
        assert_eq!(c.vit.hidden_size, None);
        // Random init from a model preset: the preset's architecture.
        let flags = Overrides {
            model: Some("vit-s16".into()),
            ..Default::default()
        };
        let mut c = RunConfig::preset("vit-b16-cifar100").unwrap();
        c.weights = None;
        let c = flags.apply(c).unwrap().finish().unwrap();
        assert_eq!((c.vit.hidden_size, c.vit.num_heads), (Some(384), Some(6)));
        // --weights on the demo drops its architecture.
        let c = resolve(
            Some("demo"),
            None,
            &Overrides {
                weights: Some("some/folder".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.vit.num_layers, None);
        // A partial architecture without a model is an error naming what is missing.
        let mut c = RunConfig::preset("demo").unwrap();
        c.vit.mlp_dim = None;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("mlp_dim"), "{e}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }
}
