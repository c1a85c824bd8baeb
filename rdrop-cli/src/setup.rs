//! A run's pieces built from its [`RunConfig`]: the dataset, the model (random init or
//! pre-trained weights) and the two loaders. Shared by `rdrop train`, `rdrop eval` and
//! `rdrop bench`, so that no command reaches into another's internals. (rdrop-core's update
//! configuration is the configuration's own view: [`RunConfig::train_config`].)

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rdrop_core::DropoutRng;
use rdrop_data::{Augment, Cifar, Loader, LoaderConfig, Split, TrainTransform};
use rdrop_vit::{load_model, LoadOptions, ViTConfig, VisionTransformer};

use crate::config::{self, AugmentKind, RunConfig};

/// The embedded demo dataset (scikit-learn digits in CIFAR-100 layout; see assets/README.md).
pub static DEMO_ARCHIVE: &[u8] = include_bytes!("../assets/digits-demo.tar.gz");

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

/// A randomly initialised model of architecture `vc` (f32 master weights on `device`).
pub fn new_model(vc: &ViTConfig, seed: u64, device: &Device) -> anyhow::Result<VisionTransformer> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    VisionTransformer::new(vc, vb, DropoutRng::new(seed)).context("building the model")
}

/// The model a run starts from: its `weights`, else a random init of `[vit]`'s architecture.
///
/// `required_model` is an explicit `--model`: with weights that have a `config.json` it must
/// agree with it (else an error naming both); the configuration's `model` alone is only the
/// architecture of weight files without a `config.json`.
pub fn initial_model(
    c: &RunConfig,
    classes: usize,
    required_model: Option<&str>,
    device: &Device,
) -> anyhow::Result<VisionTransformer> {
    let model = match &c.weights {
        Some(spec) => {
            let opts = LoadOptions {
                preset: required_model.map(str::to_string),
                fallback_preset: c.model.clone(),
                num_classes: Some(classes),
                image_size: Some(c.image_size),
                reset_head: c.reset_head,
                layer_norm_eps: c.layer_norm_eps,
                // The run's rates replace the weights' (HF in21k configs say 0.0 everywhere).
                dropout: Some(c.vit.dropout),
                attention_dropout: Some(c.vit.attention_dropout),
                attention_output_dropout: Some(c.vit.attention_output_dropout),
                device: device.clone(),
                seed: c.seed,
                ..LoadOptions::default()
            };
            crate::hub::prefetch(spec)?;
            let loaded =
                load_model(spec, &opts).with_context(|| format!("loading weights `{spec}`"))?;
            eprint!("{}", loaded.report);
            loaded.model
        }
        None => {
            let vc = c
                .vit
                .architecture(c.image_size, classes, c.layer_norm_eps)
                .context("no --weights and no architecture: pass --model PRESET (e.g. vit-b16)")?;
            new_model(&vc, c.seed, device)?
        }
    };
    with_precision(model, c)
}

/// The model of a checkpoint folder (its `config.json` decides everything but the run's
/// precision), for resuming.
pub fn checkpoint_model(
    c: &RunConfig,
    ckpt: &Path,
    device: &Device,
) -> anyhow::Result<VisionTransformer> {
    let opts = LoadOptions {
        device: device.clone(),
        seed: c.seed,
        ..LoadOptions::default()
    };
    let model = load_model(&ckpt.display().to_string(), &opts)
        .with_context(|| format!("loading the model of checkpoint {}", ckpt.display()))?
        .model;
    with_precision(model, c)
}

/// The run's `precision` decides the model's compute dtype here, and the trainer's (loss
/// scaling, input cast) through [`RunConfig::train_config`]: both from the one `RunConfig`
/// field.
fn with_precision(
    mut model: VisionTransformer,
    c: &RunConfig,
) -> anyhow::Result<VisionTransformer> {
    model.set_compute_dtype(c.compute_precision().dtype())?;
    Ok(model)
}

/// Keeps the first `n` images of `split` (all if it has fewer).
pub fn keep_first(split: &mut Split, n: usize) {
    let n = n.min(split.len());
    split.images.truncate(n * rdrop_data::IMAGE_BYTES);
    split.fine_labels.truncate(n);
    split.coarse_labels.truncate(n);
    split.filenames.truncate(n);
}

/// The training loader (micro-batches, the run's augmentation and order, `train_images`) and
/// the test loader.
pub fn loaders(c: &RunConfig, mut data: Cifar) -> anyhow::Result<(Loader, Loader)> {
    if let Some(n) = c.train_images {
        keep_first(&mut data.train, n);
    }
    let augment = match c.augment {
        AugmentKind::Recipe => Augment::Recipe(TrainTransform {
            image_size: c.image_size,
            scale: (c.crop_scale[0], c.crop_scale[1]),
            ..TrainTransform::default()
        }),
        AugmentKind::None => Augment::None,
    };
    let train = Loader::new(
        Arc::new(data.train),
        LoaderConfig {
            batch_size: c.micro(),
            image_size: c.image_size,
            seed: c.seed,
            shuffle: c.shuffle,
            drop_last: true,
            augment,
            prefetch: 4,
            threads: None,
        },
    )
    .context("building the training loader")?;
    anyhow::ensure!(
        train.batches_per_epoch() > 0,
        "the training split ({} images) is smaller than one micro-batch ({})",
        train.num_images(),
        c.micro_batch
    );
    let test = Loader::new(
        Arc::new(data.test),
        LoaderConfig::test(c.image_size, c.eval_batch_size),
    )
    .context("building the test loader")?;
    Ok((train, test))
}
