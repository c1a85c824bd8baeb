//! `rdrop predict --weights SPEC IMAGE... [--top 5] [--json]`: classifies PNG/JPEG files with
//! the recipe's test transform (Pillow-exact bilinear `Resize((S, S))` of the whole image,
//! /255, normalise with mean 0.5 / std 0.5) and prints class names with probabilities.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor, D};
use rdrop_data::Normalize;
use rdrop_vit::{load_model, LoadOptions};
use serde::Serialize;

use crate::device::ComputeArgs;
use crate::learner::Predictor;

/// Arguments of `rdrop predict`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Trained weights: a run folder (final/, best/ or the newest checkpoint), a checkpoint
    /// folder, an HF folder or hub id, a timm .safetensors or a Google .npz with a head.
    #[arg(long, value_name = "SPEC")]
    pub weights: String,
    /// Image files (PNG or JPEG; any size, converted to RGB).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Architecture preset for weight files without config.json (timm, npz).
    #[arg(long, value_name = "PRESET")]
    pub model: Option<String>,
    /// Input side (default: the model's).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Print JSON: `[{"file", "predictions": [{"class", "label", "prob"}]}]`.
    #[arg(long)]
    pub json: bool,
}

/// One class of a prediction.
#[derive(Debug, Serialize)]
pub struct Guess {
    /// Class index.
    pub class: usize,
    /// Class name (`class N` when the checkpoint has none).
    pub label: String,
    /// Softmax probability.
    pub prob: f32,
}

/// The predictions for one file.
#[derive(Debug, Serialize)]
pub struct FilePrediction {
    /// The image file.
    pub file: String,
    /// Best classes first.
    pub predictions: Vec<Guess>,
}

/// Reads an image file and applies the test transform: `(3, S, S)` f32, CHW.
pub fn load_image(path: &Path, size: usize) -> anyhow::Result<Vec<f32>> {
    let img = image::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    anyhow::ensure!(w > 0 && h > 0, "{}: empty image", path.display());
    let mut chw = vec![0u8; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            chw[c * w * h + i] = p.0[c];
        }
    }
    let resized =
        rdrop_data::resize::resize_box(&chw, 3, w, h, [0.0, 0.0, w as f32, h as f32], size, size)
            .with_context(|| format!("resizing {}", path.display()))?;
    let lut = Normalize::default().lut();
    Ok(resized
        .chunks_exact(size * size)
        .enumerate()
        .flat_map(|(c, plane)| plane.iter().map(move |&v| lut[c][v as usize]))
        .collect())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.top > 0, "--top must be at least 1");
    for p in &args.images {
        anyhow::ensure!(p.is_file(), "image file not found: {}", p.display());
    }
    let device = args.compute.open()?;
    let opts = LoadOptions {
        preset: args.model.clone(),
        image_size: args.image_size,
        device: device.clone(),
        ..Default::default()
    };
    crate::hub::prefetch(&args.weights)?;
    let mut loaded = load_model(&args.weights, &opts)
        .with_context(|| format!("loading weights `{}`", args.weights))?;
    if loaded.model.head_is_zero()? {
        anyhow::bail!(
            "the classifier of `{}` is all zeros (untrained or a new head): every class would get the same probability; pass trained weights",
            args.weights
        );
    }
    loaded
        .model
        .set_compute_dtype(args.compute.precision.dtype())?;
    let size = loaded.config.image_size;
    let classes = loaded.config.num_classes;
    let names = loaded.class_names.clone();
    let mut model = Predictor::new(loaded.model, args.compute.explicit()?)?;
    let label = |i: usize| {
        names
            .as_ref()
            .and_then(|n| n.get(i).cloned())
            .unwrap_or_else(|| format!("class {i}"))
    };
    let mut results = Vec::new();
    for path in &args.images {
        let x = load_image(path, size)?;
        let x = Tensor::from_vec(x, (1, 3, size, size), &Device::Cpu)?.to_device(&device)?;
        let logits = model.logits(&x)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let predictions = order
            .into_iter()
            .take(args.top.min(classes))
            .map(|c| Guess {
                class: c,
                label: label(c),
                prob: probs[c],
            })
            .collect();
        results.push(FilePrediction {
            file: path.display().to_string(),
            predictions,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            println!("{}", r.file);
            for g in &r.predictions {
                println!("  {:>6.2}%  {} ({})", 100.0 * g.prob, g.label, g.class);
            }
        }
    }
    Ok(())
}
